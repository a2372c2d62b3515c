"""The coordinator's HTTP side: the metrics hub (hub.py), the dashboard and its live stream
(server.py, static/), /metrics (prometheus.py), the OpenAI-shaped job API (openai_api.py,
openai_shape.py), who may do what (auth.py) and TensorBoard files (tensorboard.py)."""
