"""Self-supervised pretraining of a backbone on unlabelled dermoscopy (`isic-jax pretrain`).

    from isic_jax.pretraining import task
    result = task.pretrain(config, workdir)      # config: configs/pretrain_byol.py's schema

- `byol.py`: BYOL (Grill et al. 2020): the online/target networks on any registered
  classifier's `features`, the state, the pure train step and the embedding step.
- `views.py`: the two random views of each image, on the device inside the step.
- `probe.py`: the k-NN probe of the frozen embedding on the labelled held-out fold.
- `task.py`: BYOL as a task of the training loop (training/loop.py): the same phases,
  checkpoints, resume, preemption, parallelism and logging as `train`; pretrain.json.

The workdir is a weight source: `--config.model.init_from=WORKDIR` takes the online backbone
(training/weight_sources.py).
"""
