"""What tests share: request builders (requests), `eventually()` (polling), real processes
(processes: `batchline serve`, the drift sidecar, redis-server, nginx, MLflow, the echo server)
and the metrics scraper (metrics). Fixtures stay in the conftest files; they are built from
these."""
