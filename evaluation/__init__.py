"""Inference from training checkpoints: everything after training, beside distributed/ (which never imports it).

    checkpoints.py  read a checkpoint (or a run folder's newest) for inference: config + unwrapped fp32 weights
    classify.py     top-1/top-5 with the centre-crop and 10-crop protocols, per-class counts, confused pairs
    localize.py     class-activation-map boxes, their geometry, IoU and the ILSVRC localization criterion
    predict.py      predictions over shards (Ray tasks when spread), the Kaggle submission CSV
    report.py       results pages and charts beside the published figures, and a run's training curves

Used by `jobs.evaluate`, `jobs.predict`, `jobs.report` and `jobs.train` (curves).
"""
