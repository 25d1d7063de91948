"""Helpers of the tests and benchmarks, imported as ``support.<module>``
(``tests/`` is on ``sys.path``: pytest puts it there for ``tests/conftest.py``;
child processes get it from ``support.lambda_source.checkout_pythonpath``; the
benchmarks, run as scripts, add it themselves).

- ``helpers``: the test job's path, an in-process drain loop, fake AWS settings.
- ``procs``: ``fanout`` commands and workers as subprocesses, polling with deadlines.
- ``lambda_source``, ``lambda_invoke``: what Lambda's SQS event source does.
- ``motopatch``, ``motoserver``: moto made fast enough, and as a server on 127.0.0.1.
- ``sites``, ``hardsite``: test web sites for the crawl engine.
- ``hang_after_put``: ``fanout`` whose store hangs after writing an output file.
- ``kill_at``: ``fanout`` that SIGKILLs itself between two steps of a compaction.
- ``make_site``, ``make_readings``: generators of the demo site and of sample
  meter readings (what ``jobs/site/`` and ``jobs/data/readings/`` were made with).
"""
