"""Tables: a job's output as one partitioned table that several runs add to.

A job with ``partition_by`` (``Job(..., partition_by="read_at:day")``) writes its
records to Hive-style keys, ``tables/<table>/dt=2024-01-01/<file>.avro``, and
every run that finishes adds its committed files to the table's **catalog**
(``tables/<table>/_catalog/v<N>.json``). The catalog, not a listing of keys, is
what a table holds: a file an attempt wrote but never committed (a crash, a
timeout) is in no catalog version, exactly as an unmanifested run file counts
for nothing today.

Modules, one job each:

- :mod:`fanout.tables.spec`: the table options of a job and partition values;
- :mod:`fanout.tables.writer`: a chunk's records, one Avro file per partition;
- :mod:`fanout.tables.catalog`: catalog versions and their atomic swap;
- :mod:`fanout.tables.commit`: a finished run joins its table;
- :mod:`fanout.tables.compat`: Avro's schema resolution rules (pure);
- :mod:`fanout.tables.contract`: the schema contract, checked at submit;
- :mod:`fanout.tables.compact`: crash-safe compaction;
- :mod:`fanout.tables.gc`: garbage collection;
- :mod:`fanout.tables.glue`: the AWS Glue table.
"""
