"""The study: does BERT's optimization recipe do what its claims say? (``bertopt study``)

variants.py   the optimizer variants compared, as CLI flags of pretrain/finetune
grid.py       runs every (task, variant, seed) and collects metrics and summaries
stats.py      mean/std over seeds and paired differences against the BERT recipe
early_steps.py  update size with and without bias correction under warmup, measured vs analytic
report.py     the Markdown report and its plots
command.py    the CLI subcommand
"""
