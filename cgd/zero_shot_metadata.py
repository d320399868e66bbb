"""Class names and prompt templates for CLIP zero-shot classification of the built-in datasets."""
from __future__ import annotations

# Readable names for CIFAR-10 (the authors map e.g. "automobile" to "car").
CIFAR10_CLASSNAMES = ["airplane", "car", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]

GTSRB_CLASSNAMES = [
    "red and white circle 20 kph speed limit", "red and white circle 30 kph speed limit",
    "red and white circle 50 kph speed limit", "red and white circle 60 kph speed limit",
    "red and white circle 70 kph speed limit", "red and white circle 80 kph speed limit",
    "end / de-restriction of 80 kph speed limit", "red and white circle 100 kph speed limit",
    "red and white circle 120 kph speed limit", "red and white circle red car and black car no passing",
    "red and white circle red truck and black car no passing", "red and white triangle road intersection warning",
    "white and yellow diamond priority road", "red and white upside down triangle yield right-of-way",
    "stop", "empty red and white circle", "red and white circle no truck entry",
    "red circle with white horizonal stripe no entry", "red and white triangle with exclamation mark warning",
    "red and white triangle with black left curve approaching warning",
    "red and white triangle with black right curve approaching warning",
    "red and white triangle with black double curve approaching warning",
    "red and white triangle rough / bumpy road warning", "red and white triangle car skidding / slipping warning",
    "red and white triangle with merging / narrow lanes warning",
    "red and white triangle with person digging / construction / road work warning",
    "red and white triangle with traffic light approaching warning",
    "red and white triangle with person walking warning", "red and white triangle with child and person walking warning",
    "red and white triangle with bicyle warning", "red and white triangle with snowflake / ice warning",
    "red and white triangle with deer warning", "white circle with gray strike bar no speed limit",
    "blue circle with white right turn arrow mandatory", "blue circle with white left turn arrow mandatory",
    "blue circle with white forward arrow mandatory", "blue circle with white forward or right turn arrow mandatory",
    "blue circle with white forward or left turn arrow mandatory", "blue circle with white keep right arrow mandatory",
    "blue circle with white keep left arrow mandatory", "blue circle with white arrows indicating a traffic circle",
    "white circle with gray strike bar indicating no passing for cars has ended",
    "white circle with gray strike bar indicating no passing for trucks has ended",
]

# A compact ensemble in the style of CLIP's prompt engineering.
DEFAULT_TEMPLATES = [
    "a photo of a {}.",
    "a blurry photo of a {}.",
    "a low resolution photo of a {}.",
    "a photo of the small {}.",
    "a photo of the big {}.",
    "a good photo of a {}.",
    "a close-up photo of a {}.",
]

GTSRB_TEMPLATES = [
    'a zoomed in photo of a "{}" traffic sign.',
    'a centered photo of a "{}" traffic sign.',
    'a close up photo of a "{}" traffic sign.',
]

TINYIMAGENET_TEMPLATES = DEFAULT_TEMPLATES


def default_classnames(dataset_kind: str, classes: list[str]) -> list[str]:
    """Readable class names for prompts: built-in maps where known, else the given names with '_' as spaces."""
    if dataset_kind == "cifar10" and len(classes) == 10:
        return list(CIFAR10_CLASSNAMES)
    if dataset_kind == "gtsrb" and len(classes) == 43:
        return list(GTSRB_CLASSNAMES)
    return [c.replace("_", " ") for c in classes]


def default_templates(dataset_kind: str) -> list[str]:
    return list(GTSRB_TEMPLATES if dataset_kind == "gtsrb" else DEFAULT_TEMPLATES)
