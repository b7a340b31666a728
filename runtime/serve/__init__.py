"""``foresight-serve``: an OpenAI-style video generation server over engines folders.

``app`` (FastAPI endpoints), ``store`` (the SQLite job store: the queue and every job's
record), ``generator`` (one Runtime per model; request checks with the runtime's rules),
``workers`` (jobs run in this process) and ``ray_runner`` (jobs run on Ray Serve replicas).
Needs the ``serve`` extra (FastAPI, uvicorn, prometheus-client); Ray is the ``ray`` extra.
"""
