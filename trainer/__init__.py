"""The training app (ARCHITECTURE §7): a DALI-fed open_clip CLIP/CoCa trainer that reads curate's export.

Kept apart from ``curate`` the way open_clip keeps its model library apart from its training script:
nothing in ``curate`` imports this package. Entry point: ``python -m trainer.train``.
"""
