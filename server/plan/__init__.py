"""Will it fit? Weight and KV-cache memory of a model, from its config alone, against this machine's memory.

`python -m server --plan` prints the table for MODEL_PATH. Nothing is loaded: a folder or hub repo gives its
config.json, a .gguf file its metadata header. Parameters are counted from the shapes in the config; the
bitsandbytes figures follow what bitsandbytes actually stores, since transformers quantizes every nn.Linear but
lm_head and leaves embeddings, norms and biases in the compute dtype:
  8bit      1 byte per weight + one float32 scale per output row (SCB)
  4bit nf4  half a byte per weight + one float32 absmax per 64-weight block
  + double  the absmax as uint8 + one float32 per 256 blocks (+ one shared 256-entry code)
The loader logs this estimate next to the measured figure (`measured_weight_bytes`) after every load.
"""

from server.plan.machine import Memory, machine_memory, ram_memory
from server.plan.report import Plan, Row, format_plan, gib, make_plan, plan_for_settings, print_plan, verdict
from server.plan.shape import (
           RUNTIME_RESERVE,
           VERIFIED,
           GiB,
           ModelShape,
           PlanError,
           read_shape,
           shape_from_config,
           shape_from_gguf,
)
from server.plan.sizes import (
           PRECISIONS,
           Precision,
           estimate_loaded,
           linear_bytes,
           measured_weight_bytes,
           precision_of,
           weight_bytes,
)

__all__ = ["GiB", "PRECISIONS", "RUNTIME_RESERVE", "VERIFIED", "Memory", "ModelShape", "Plan", "PlanError", "Precision",
           "Row", "estimate_loaded", "format_plan", "gib", "linear_bytes", "machine_memory", "make_plan",
           "measured_weight_bytes", "plan_for_settings", "precision_of", "print_plan", "ram_memory", "read_shape",
           "shape_from_config", "shape_from_gguf", "verdict", "weight_bytes"]
