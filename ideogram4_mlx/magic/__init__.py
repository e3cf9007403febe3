"""Magic prompt: a plain idea -> an Ideogram 4 JSON caption, with a local causal LM."""
