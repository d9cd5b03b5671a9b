"""Models that score an image against a goal, for gradient guidance (``core.guidance``): CLIP
against a text prompt (:mod:`gigasid.guidance.clip`)."""
