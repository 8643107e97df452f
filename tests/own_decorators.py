"""A decorator of the user's own, in a file of its own, as a lab's utilities module would be:
an error raised in it, or in what it decorates, is the user's."""

import functools


def counted(builder):
    """``builder`` (a network's), counting its calls; it raises on the ``fail_at``-th."""

    @functools.wraps(builder)
    def wrapper(*args, **kwargs):
        wrapper.calls += 1
        if wrapper.calls == wrapper.fail_at:
            raise RuntimeError("counted too many")
        return builder(*args, **kwargs)

    wrapper.calls, wrapper.fail_at = 0, None
    return wrapper
