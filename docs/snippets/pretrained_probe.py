import numpy as np
import torch
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import cross_val_score

from dynsparse.data.text import load_text
from dynsparse.pretrained import load_pretrained

torch.set_num_threads(1)
encoder = load_pretrained("all-minilm-l6-v2")
train, test = load_text("rotten-tomatoes", "train"), load_text("rotten-tomatoes", "test")
x_train, x_test = encoder.encode(train.texts).numpy(), encoder.encode(test.texts).numpy()
y_train, y_test = np.array(train.labels), np.array(test.labels)
cv = {
    c: cross_val_score(LogisticRegression(C=c, max_iter=5000), x_train, y_train, cv=5).mean() for c in (0.1, 1, 10, 100)
}
best = max(cv, key=cv.get)
probe = LogisticRegression(C=best, max_iter=5000).fit(x_train, y_train)
print("5-fold CV accuracy by C:", {c: round(100 * a, 2) for c, a in cv.items()})
print(f"C = {best}: test accuracy {100 * probe.score(x_test, y_test):.2f} % on {len(y_test)} snippets")
print(f"majority class: {100 * max(y_test.mean(), 1 - y_test.mean()):.2f} %")
