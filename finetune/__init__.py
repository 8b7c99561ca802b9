"""Fine-tune a served model on your own data with LoRA or QLoRA: `python -m finetune DATA --out DIR`.

The adapter it writes is served at once by `LORA_MODULES=name=DIR python -m server` (and merged by
`python -m server.merge`); rows are rendered by the same model-family code the server uses.
"""
