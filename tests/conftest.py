"""Shared test setup: the suite never touches the network (all models come from pip packages)."""

import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
