"""herd: LoRA/QLoRA fine-tuning across a cluster of Apple Silicon Macs.

This package is the shared vocabulary of the control plane (``coordinator/``) and the data plane
(``worker/``): the CLI dispatcher, the job-config schema, errors, auth and logging. It imports neither.
"""

__version__ = "0.1.0"
PROTOCOL_VERSION = 1
