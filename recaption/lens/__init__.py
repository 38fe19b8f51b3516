"""The bundled minimal Lens trainer: a small MMDiT trained with rectified flow on the corpus.

config.py  presets and settings      data.py     corpus Parquet -> shuffled batches (no torch)
text.py    MiniLM features, cached    model.py    the MMDiT
flow.py    loss and Euler sampler     train.py    the loop, checkpoints, metrics
sample.py  load a run, draw images    run.py      the run folder
prompts.py held-out eval prompts      detect.py   shapes in a generated image (no torch)
eval.py    GenEval-style scoring      (`make ablation`: recaption/ablation.py, beside it)
"""
