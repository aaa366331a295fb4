"""LightningModules: `DistillationModule` (to come, issue 4)."""

__all__: list[str] = []
