"""The grounded workload of `spec_speed.py`, frozen: eight short Python files, each given in a chat prompt with
one rename asked for, so the answer copies most of the prompt (the input-grounded case prompt lookup is for).

Frozen so that figures of different sessions compare (it used to take this repository's own small source files,
which changed as the code did). Short files, one rename each: SmolLM2-135M rewrites longer files rather than
copy them (RESULTS.md, session 32).
"""

TEMPLATE = "```python\n{src}```\nRewrite this code with `{old}` renamed to `{new}`."

# (old name, new name, the file)
SNIPPETS = [
("count_words", "tally_words", '''import re
from collections import Counter


def count_words(text, min_length=1):
    """Return a Counter of the lower-cased words in text that have at least min_length letters."""
    words = re.findall(r"[a-zA-Z']+", text)
    counts = Counter()
    for word in words:
        word = word.lower().strip("'")
        if len(word) >= min_length:
            counts[word] += 1
    return counts


def most_common(text, n=10):
    counts = count_words(text, min_length=3)
    return [word for word, _ in counts.most_common(n)]
'''),
("Stack", "LifoStack", '''class Stack:
    """A last-in, first-out container with a size limit."""

    def __init__(self, limit=100):
        self.items = []
        self.limit = limit

    def push(self, item):
        if len(self.items) >= self.limit:
            raise OverflowError(f"stack is full ({self.limit} items)")
        self.items.append(item)

    def pop(self):
        if not self.items:
            raise IndexError("pop from an empty stack")
        return self.items.pop()

    def peek(self):
        return self.items[-1] if self.items else None

    def __len__(self):
        return len(self.items)
'''),
("binary_search", "find_sorted", '''def binary_search(values, target):
    """Index of target in the sorted list values, or -1 when it is absent."""
    low, high = 0, len(values) - 1
    while low <= high:
        middle = (low + high) // 2
        if values[middle] == target:
            return middle
        if values[middle] < target:
            low = middle + 1
        else:
            high = middle - 1
    return -1


def contains(values, target):
    return binary_search(values, target) >= 0
'''),
("primes_below", "list_primes", '''def primes_below(limit):
    """All prime numbers smaller than limit, by the sieve of Eratosthenes."""
    if limit < 3:
        return []
    is_prime = [True] * limit
    is_prime[0] = is_prime[1] = False
    for number in range(2, int(limit ** 0.5) + 1):
        if is_prime[number]:
            for multiple in range(number * number, limit, number):
                is_prime[multiple] = False
    return [number for number, prime in enumerate(is_prime) if prime]


def count_primes(limit):
    return len(primes_below(limit))
'''),
("read_config", "load_settings", '''def read_config(path):
    """Parse a file of key = value lines into a dict; lines starting with # are comments."""
    config = {}
    with open(path) as f:
        for number, line in enumerate(f, start=1):
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            if "=" not in line:
                raise ValueError(f"line {number} of {path} has no '='")
            key, value = line.split("=", 1)
            config[key.strip()] = value.strip()
    return config


def get_int(config, key, default=0):
    return int(config.get(key, default))
'''),
("transpose", "flip_matrix", '''def transpose(matrix):
    """The transpose of a matrix given as a list of equal-length rows."""
    if not matrix:
        return []
    rows, cols = len(matrix), len(matrix[0])
    return [[matrix[r][c] for r in range(rows)] for c in range(cols)]


def multiply(a, b):
    """The matrix product of a and b."""
    columns = transpose(b)
    return [[sum(x * y for x, y in zip(row, col)) for col in columns] for row in a]


def identity(n):
    return [[1 if r == c else 0 for c in range(n)] for r in range(n)]
'''),
("Temperature", "Reading", '''class Temperature:
    """A temperature in degrees Celsius, convertible to Fahrenheit and Kelvin."""

    def __init__(self, celsius):
        if celsius < -273.15:
            raise ValueError("below absolute zero")
        self.celsius = celsius

    def fahrenheit(self):
        return self.celsius * 9 / 5 + 32

    def kelvin(self):
        return self.celsius + 273.15

    def __repr__(self):
        return f"Temperature({self.celsius})"
'''),
("moving_average", "rolling_mean", '''def moving_average(values, window):
    """The mean of each run of window consecutive values."""
    if window <= 0:
        raise ValueError("window must be positive")
    averages = []
    total = sum(values[:window])
    if len(values) >= window:
        averages.append(total / window)
    for i in range(window, len(values)):
        total += values[i] - values[i - window]
        averages.append(total / window)
    return averages
'''),
]


def grounded_prompts(n: int = len(SNIPPETS)) -> list[str]:
    return [TEMPLATE.format(src=src, old=old, new=new) for old, new, src in SNIPPETS[:n]]
