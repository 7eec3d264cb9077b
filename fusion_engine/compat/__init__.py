"""Drop-in layers: fusion_engine.compat.peft and fusion_engine.compat.mergekit (issue 4)."""
