"""Start-up hygiene for every entry point: importing this module (before diffusers or transformers) drops two
warnings that every launch printed about things this project does not use, and nothing else: transformers' note that
torchvision is missing for image processors (the pipelines' safety-checker feature extractors; nothing here builds
one), and diffusers' "modules that should be kept in float32: []" on a dtype cast of a model that has no such
module. Real warnings from the same loggers still show (tests/test_startup.py)."""

import logging


class _DropMessages(logging.Filter):
    def __init__(self, *fragments):
        super().__init__()
        self.fragments = fragments

    def filter(self, record):
        return not any(fragment in record.getMessage() for fragment in self.fragments)


def quiet_startup_warnings():
    """Install the two filters (idempotent: a logger keeps one filter per call, each dropping the same messages)."""
    logging.getLogger("transformers.utils.import_utils").addFilter(_DropMessages("requires torchvision (not installed)"))
    logging.getLogger("diffusers.models.modeling_utils").addFilter(_DropMessages("should be kept in float32: [].",))


quiet_startup_warnings()
