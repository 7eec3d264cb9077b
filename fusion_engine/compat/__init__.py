"""Drop-in layers: fusion_engine.compat.peft, fusion_engine.compat.mergekit and fusion_engine.compat.scipy."""
