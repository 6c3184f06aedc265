"""`ddm serve`: a run's routed ensemble as an HTTP service (FastAPI on uvicorn; docs/serving.md).

`app.create_app` builds the service; `batcher` runs generations on one background worker behind a bounded
queue, merging compatible requests into one device call; `jobs` keeps the asynchronous jobs; `schemas` holds
the request model and the arrays' wire format; `metrics` the Prometheus counters; `page` the HTML form served
at `/`; `client` is `ddm sample --server`'s side; `k8s` writes `ddm serve --launcher k8s`'s manifest.
"""
