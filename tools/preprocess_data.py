"""Tokenise text / JSONL files into a Megatron-Core indexed dataset (.bin/.idx).

    python tools/preprocess_data.py --input corpus.jsonl --json-keys text \
        --tokenizer-dir path/to/hf_model --output-prefix data/corpus --split-held-out 0.05
"""

from megatron_dmc.data.preprocess import main

if __name__ == "__main__":
    main()
