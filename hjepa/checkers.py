"""fastargs checkers stricter than fastargs 1.2.0's own, whose Int and Bool coerce too eagerly
(int(3.7) == 3, bool("False") is True), plus the list and range types fastargs lacks."""
import math

from fastargs.validation import Checker


class Boolean(Checker):
    def check(self, value):
        if isinstance(value, bool):
            return value
        if isinstance(value, int) and value in (0, 1):
            return bool(value)
        if isinstance(value, str) and value.strip().lower() in ("0", "1", "true", "false"):
            return value.strip().lower() in ("1", "true")
        raise ValueError(value)

    def help(self):
        return "0/1/true/false"


class Integer(Checker):
    def __init__(self, min=-math.inf, max=math.inf):
        self.min, self.max = min, max

    def check(self, value):
        if isinstance(value, bool):
            raise ValueError(value)
        if isinstance(value, float) and not value.is_integer():
            raise ValueError(value)
        value = int(value)
        if not self.min <= value <= self.max:
            raise ValueError(value)
        return value

    def help(self):
        return "an integer" + _range_text(self.min, self.max)


class Number(Checker):
    def __init__(self, min=-math.inf, max=math.inf):
        self.min, self.max = min, max

    def check(self, value):
        if isinstance(value, bool):
            raise ValueError(value)
        value = float(value)
        if math.isnan(value) or not self.min <= value <= self.max:
            raise ValueError(value)
        return value

    def help(self):
        return "a number" + _range_text(self.min, self.max)


class Choice(Checker):
    def __init__(self, *choices):
        self.choices = choices

    def check(self, value):
        if value not in self.choices:
            raise ValueError(value)
        return value

    def help(self):
        return "one of " + "|".join(self.choices)


class Text(Checker):
    def check(self, value):
        if isinstance(value, (dict, list)):
            raise ValueError(value)
        return str(value)

    def help(self):
        return "a string"


class NumberList(Checker):
    """Comma-separated numbers, e.g. `1.0,0.5,0.25` (fastargs has no list type). Empty = []."""

    def check(self, value):
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return [float(value)]
        if isinstance(value, (list, tuple)):
            items = list(value)
        else:
            items = [s for s in str(value).replace(" ", "").split(",") if s]
        numbers = [float(x) for x in items]
        if any(math.isnan(x) or math.isinf(x) for x in numbers):
            raise ValueError(value)
        return numbers

    def help(self):
        return "comma-separated numbers"


class NumberPair(Checker):
    """Two numbers lo <= hi, as a YAML list `[0.15, 0.2]` or on the command line `0.15,0.2`."""

    def __init__(self, min=-math.inf, max=math.inf):
        self.min, self.max = min, max

    def check(self, value):
        items = list(value) if isinstance(value, (list, tuple)) else [s for s in str(value).replace(" ", "").split(",") if s]
        if len(items) != 2 or any(isinstance(x, bool) for x in items):
            raise ValueError(value)
        lo, hi = (float(x) for x in items)
        if math.isnan(lo) or math.isnan(hi) or not self.min <= lo <= hi <= self.max:
            raise ValueError(value)
        return (lo, hi)

    def help(self):
        return "two numbers lo,hi" + _range_text(self.min, self.max)


def _range_text(lo, hi):
    if lo == -math.inf and hi == math.inf:
        return ""
    if hi == math.inf:
        return f" >= {lo}"
    if lo == -math.inf:
        return f" <= {hi}"
    return f" in [{lo}, {hi}]"
