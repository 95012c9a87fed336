import torch

from dynsparse.pretrained import load_pretrained

torch.set_num_threads(1)
encoder = load_pretrained("all-minilm-l6-v2")  # SentenceEncoder: BertModel + tokenizer, mean pooling, L2 norm
bert = encoder.model
print(
    type(bert).__name__,
    bert.config.num_hidden_layers,
    "layers,",
    bert.config.hidden_size,
    "wide,",
    sum(p.numel() for p in bert.parameters()),
    "parameters",
)
sentences = [
    "A man is playing a guitar.",
    "Someone is playing an instrument.",
    "The stock market fell sharply today.",
    "Shares dropped on Wall Street.",
]
emb = encoder.encode(sentences)  # (4, 384), unit norm
print(emb.shape)
print((emb @ emb.T).numpy().round(2))  # cosine similarities: pairs (0, 1) and (2, 3) are close
