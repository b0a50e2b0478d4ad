"""The error a tool reports as one ``error: ...`` line (exit status 2) instead of a traceback, and the dataset
check that raises it; imported by the trainer and by every tool module."""
import contextlib

__all__ = ["ToolError", "empty_dataset_is_a_tool_error"]


class ToolError(Exception):
    """An expected failure of a tool (bad input): printed as ``error: <message>``, exit code 2."""


@contextlib.contextmanager
def empty_dataset_is_a_tool_error(dataset: str):
    """detectron2 asserts ``Dataset '<name>' is empty!`` when a loader is built on a dataset without images: a
    :class:`ToolError` naming it instead of a traceback."""
    try:
        yield
    except AssertionError as e:
        if "is empty" not in str(e):
            raise
        raise ToolError(f"dataset {dataset!r} has no images ({e}): register it with images, or choose another "
                        f"(DATASETS.TEST / --dataset)") from None
