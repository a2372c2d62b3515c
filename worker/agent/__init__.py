"""The worker agent: the daemon, one per machine. It serves WorkerService, starts and stops one
rank process per job, and relays what the rank reports to the coordinator. It imports no MLX
(tests/test_architecture.py checks it): all it needs of a rank is its events and its topology."""
