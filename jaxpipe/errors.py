"""Exceptions jaxpipe raises for bad input. All derive from ValueError so callers can catch them plainly."""


class JaxpipeError(ValueError):
    """Base class: bad input that jaxpipe detected before doing expensive work."""


class ConfigError(JaxpipeError):
    """A config.json that jaxpipe cannot run (unknown field, unsupported architecture or RoPE type)."""


class CheckpointError(JaxpipeError):
    """A missing, truncated or corrupt checkpoint file, or a tensor with the wrong name or shape."""


class LayoutError(JaxpipeError):
    """An impossible parallel layout: too few devices, more stages than layers, heads not divisible."""


class MemoryPlanError(JaxpipeError):
    """A plan whose weights and KV cache do not fit the devices' memory."""


class UsageError(JaxpipeError):
    """A bad argument value from the user: a command-line flag, an ``LLM`` or ``SamplingParams`` argument,
    a prompt. The ``jaxpipe`` command prints these (and every other ``JaxpipeError``) as one line."""
