"""The web dashboard (``fanout ui``) and the self-contained run report
(``fanout report``).

- :mod:`fanout.ui.views`: what a page shows, read through the backend
  Protocols only (so the local and the AWS backends look alike);
- :mod:`fanout.ui.timeline`: attempts, lanes and throughput from a run's tasks;
- :mod:`fanout.ui.svg`: the charts, drawn as SVG by the server;
- :mod:`fanout.ui.render`: the Jinja2 environment (autoescape on) shared by the
  server and the report;
- :mod:`fanout.ui.app`: the Starlette application: pages, live updates, actions
  and the safety checks (host, token, CSRF, read-only);
- :mod:`fanout.ui.report`: ``fanout report RUN -o run.html``.

Needs the ``ui`` extra (``pip install 'fanout[ui]'``); nothing here is imported
by the workers or the Lambda handler.
"""
