"""Fourth review of classic pruning and importance: regressions for the bugs it found."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from dynsparse import ConfigError
from dynsparse.prune import LotteryTicket, imp

torch.set_num_threads(1)


def _mlp() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 10), nn.ReLU(), nn.Linear(10, 4))


def test_lottery_ticket_refuses_row_scope():
    # scope="row" (added to unstructured_) passed the check and prune_ then pruned nothing at all
    with pytest.raises(ConfigError, match="scope 'row'"):
        LotteryTicket(_mlp(), rate=0.5, scope="row")
    with pytest.raises(ConfigError, match="scope 'row'"):
        imp(_mlp(), lambda model, ticket: None, rounds=1, scope="row")
