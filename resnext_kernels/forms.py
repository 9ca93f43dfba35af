"""The ResNeXt paper's three equivalent forms of the aggregated transformation
(Xie et al. 2017, Fig. 3), built from one set of weights:

* (a) ``C`` parallel paths, each 1x1 (C_in → d) → 3x3 (d → d) → 1x1 (d → C_out), summed;
* (b) early concatenation: the paths' 1x1 → 3x3 outputs concatenated, then one 1x1;
* (c) one 1x1 (C_in → C·d) → one grouped 3x3 (C groups) → one 1x1 — the form every
  ResNeXt implementation uses, with its 3x3 + BN + ReLU run by the fused op.

BatchNorm + ReLU follow the first two layers as in a real bottleneck; BatchNorm is
per channel, so it splits across paths exactly. ``tests/test_forms.py`` checks
that the three outputs agree to float64 rounding, in eval and in training mode.
"""

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .functional import fused_group_conv_bn_relu


def _bn_relu(h, bn, training):
    """BatchNorm (batch statistics in training, the running ones in eval; the running
    statistics are never updated, so every form sees the same) + ReLU."""
    weight, bias, mean, var = bn
    return F.relu(F.batch_norm(h, None if training else mean, None if training else var,
                               weight, bias, training))


@dataclass
class AggregatedTransform:
    """Weights of one aggregated transformation (shapes for C paths of width d):

    w1 ``[C·d, C_in, 1, 1]``, w2 ``[C·d, d, 3, 3]`` (grouped), w3 ``[C_out, C·d, 1, 1]``;
    bn1 and bn2 ``(weight, bias, running_mean, running_var)``, each ``[C·d]``.
    """

    cardinality: int
    w1: torch.Tensor
    bn1: tuple
    w2: torch.Tensor
    bn2: tuple
    w3: torch.Tensor

    @classmethod
    def random(cls, in_channels, cardinality, width, out_channels, *,
               dtype=torch.float64, generator=None):
        cd = cardinality * width

        def randn(*shape):
            return torch.randn(*shape, generator=generator, dtype=dtype)

        def bn():
            return (randn(cd).abs() + 0.5, randn(cd), randn(cd) * 0.1, randn(cd).abs() + 0.5)

        return cls(cardinality, randn(cd, in_channels, 1, 1) / in_channels ** 0.5, bn(),
                   randn(cd, width, 3, 3) / (9 * width) ** 0.5, bn(),
                   randn(out_channels, cd, 1, 1) / cd ** 0.5)

    def _paths(self, x, stride, training):
        """Per path i: relu(bn2_i(conv3x3_i(relu(bn1_i(conv1x1_i(x))))))."""
        d = self.w2.shape[1]
        outs = []
        for i in range(self.cardinality):
            part = slice(i * d, (i + 1) * d)
            h = _bn_relu(F.conv2d(x, self.w1[part]), [t[part] for t in self.bn1], training)
            h = F.conv2d(h, self.w2[part], stride=stride, padding=1)
            outs.append(_bn_relu(h, [t[part] for t in self.bn2], training))
        return outs

    def form_a(self, x, stride=1, training=False):
        """(a) C paths, each ending in its own 1x1 projection, summed."""
        d = self.w2.shape[1]
        return sum(F.conv2d(h, self.w3[:, i * d:(i + 1) * d])
                   for i, h in enumerate(self._paths(x, stride, training)))

    def form_b(self, x, stride=1, training=False):
        """(b) C paths concatenated, then one 1x1 projection."""
        return F.conv2d(torch.cat(self._paths(x, stride, training), dim=1), self.w3)

    def form_c(self, x, stride=1, training=False, backend="auto"):
        """(c) 1x1 → grouped 3x3 + BN + ReLU (the fused op) → 1x1."""
        h = _bn_relu(F.conv2d(x, self.w1), self.bn1, training)
        g2, b2, m2, v2 = self.bn2
        h = fused_group_conv_bn_relu(h, self.w2, g2, b2, None if training else m2,
                                     None if training else v2, stride=stride,
                                     groups=self.cardinality, training=training,
                                     backend=backend)
        return F.conv2d(h, self.w3)
