"""The merge pipeline for checkpoints: mergekit YAML -> validated plan -> streaming executor.

- :mod:`.config`: parse and validate the YAML (:func:`~.config.load_config`);
- :mod:`.planner`: check it against the checkpoints' headers and build a :class:`~.plan.MergePlan`;
- :mod:`.plan`: the plan contract (tensor tasks, references, side files) shared by planner and executor;
- :mod:`.executor`: stream, merge and write the plan (:func:`~.executor.run_plan`);
- :mod:`.distributed`: the same under ``torchrun``, ranks splitting the tasks by bytes.
"""
