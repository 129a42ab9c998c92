# Benign: what a model usually runs. Counts words in the context it was given.
import collections
import re

words = re.findall(r"[a-z']+", context.lower())
print(f"RESULT: {len(words)} words; most common: {collections.Counter(words).most_common(3)}")
