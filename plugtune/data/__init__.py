from plugtune.data.batching import collate
from plugtune.data.formats import DataError, Example, load_examples
from plugtune.data.tokenize import IGNORE_INDEX, TokenizeStats, Tokenized, prompt_ids, tokenize_dataset, tokenize_example

__all__ = ["DataError", "Example", "IGNORE_INDEX", "TokenizeStats", "Tokenized", "collate", "load_examples",
           "prompt_ids", "tokenize_dataset", "tokenize_example"]
