"""Dynamic networks written the way their papers' public code writes them (our own code, the same
control-flow constructs, plain PyTorch, no nestnas API inside `forward`): shallow-deep early exits
on VGG, ResNet, Wide-ResNet and MobileNetV2 (SDN), SkipNet with a recurrent gate and blocks kept
in a dict, BlockDrop, greedy image captioning, DeeBERT, PABEE and an ACT/PALBERT halting loop.

Small (8-32 channels, 3x16x16 images, 8-token sequences), random weights with batch-norm
statistics recalibrated on random inputs (so activations have a trained net's scale), and a
`calibrate(inputs)` that sets each threshold to a midpoint of the values it sees, so that a mixed
set of inputs takes every branch. `literature(seed)` builds them all; `inputs_for(name, n, seed)`
gives n varied example calls."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from dynamic_nets import midpoint

IMAGE = (1, 3, 16, 16)
VOCAB, SEQ = 50, 8


def conv_bn(cin: int, cout: int, stride: int = 1, groups: int = 1, k: int = 3) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, k, stride, k // 2, groups=groups, bias=False), nn.BatchNorm2d(cout),
                         nn.ReLU())


def internal_classifier(c: int, classes: int = 10) -> nn.Sequential:
    return nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(c, classes))


def recalibrate_bn(model: nn.Module, inputs, seed: int = 0) -> nn.Module:
    """Batch-norm statistics of `model` re-estimated on `inputs` (cumulative average), then eval.
    Other layers keep their random weights; dropout is off while the statistics are gathered."""
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    for m in bns:
        m.reset_running_stats()
        m.momentum = None
    model.eval()
    for m in bns:
        m.train()
    with torch.no_grad():
        for args in inputs:
            model.statistics(*args)
    return model.eval()


# --- shallow-deep networks (Kaya et al., ICML 2019): internal classifiers, exit by confidence ----------

class SDN(nn.Module):
    """An SDN: `init_conv`, a ModuleList of `layers`, an internal classifier after the layers marked
    in `add_output` and `end_layers`; at inference the first classifier whose top softmax
    probability passes `confidence_threshold` answers."""

    def __init__(self, init_conv: nn.Module, layers: list[nn.Module], add_output: list[bool], widths: list[int]):
        super().__init__()
        self.init_conv = init_conv
        self.layers = nn.ModuleList(layers)
        self.add_output = add_output
        self.exits = nn.ModuleList(internal_classifier(w) for w, out in zip(widths, add_output) if out)
        self.end_layers = internal_classifier(widths[-1])
        self.confidence_threshold = 0.5

    def forward(self, x):
        fwd = self.init_conv(x)
        output_id = 0
        for i in range(len(self.layers)):
            fwd = self.layers[i](fwd)
            if self.add_output[i]:
                output = self.exits[output_id](fwd)
                confidence = torch.max(F.softmax(output, dim=1))
                if confidence >= self.confidence_threshold:
                    return output
                output_id += 1
        return self.end_layers(fwd)

    def confidences(self, x) -> list[float]:
        with torch.no_grad():
            fwd, out, k = self.init_conv(x), [], 0
            for i, layer in enumerate(self.layers):
                fwd = layer(fwd)
                if self.add_output[i]:
                    out.append(float(F.softmax(self.exits[k](fwd), dim=1).max()))
                    k += 1
        return out

    def statistics(self, x):
        fwd = self.init_conv(x)
        for layer in self.layers:
            fwd = layer(fwd)
        return self.end_layers(fwd)

    def calibrate(self, inputs):
        """Half the inputs never reach the threshold (they run every layer), the rest exit early."""
        self.confidence_threshold = midpoint(max(self.confidences(x)) for x in inputs)


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int = 1, widen_dropout: float = 0.0):
        super().__init__()
        self.conv1 = conv_bn(cin, cout, stride)
        self.drop = nn.Dropout(widen_dropout)
        self.conv2 = nn.Sequential(nn.Conv2d(cout, cout, 3, 1, 1, bias=False), nn.BatchNorm2d(cout))
        self.shortcut = nn.Sequential()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        return F.relu(self.conv2(self.drop(self.conv1(x))) + self.shortcut(x))


class InvertedResidual(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int, expand: int = 4):
        super().__init__()
        mid = cin * expand
        self.use_res = stride == 1 and cin == cout
        self.conv = nn.Sequential(conv_bn(cin, mid, k=1), conv_bn(mid, mid, stride, groups=mid),
                                  nn.Conv2d(mid, cout, 1, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        if self.use_res:
            return x + self.conv(x)
        return self.conv(x)


def sdn_vgg() -> SDN:
    widths, strides = [16, 16, 32, 32, 32, 32], [1, 2, 1, 2, 1, 1]
    layers = [conv_bn(w_in, w, s) for w_in, w, s in zip([16] + widths[:-1], widths, strides)]
    return SDN(conv_bn(3, 16), layers, [False, True, False, True, True, False], widths)


def sdn_resnet() -> SDN:
    widths, strides = [16, 16, 32, 32, 32, 32], [1, 1, 2, 1, 2, 1]
    layers = [BasicBlock(w_in, w, s) for w_in, w, s in zip([16] + widths[:-1], widths, strides)]
    return SDN(conv_bn(3, 16), layers, [True, False, True, False, True, False], widths)


def sdn_wide_resnet() -> SDN:
    widths, strides = [32, 32, 32, 32], [1, 2, 1, 2]
    layers = [BasicBlock(w_in, w, s, widen_dropout=0.3) for w_in, w, s in zip([16] + widths[:-1], widths, strides)]
    return SDN(conv_bn(3, 16), layers, [True, True, True, False], widths)


def sdn_mobilenet() -> SDN:
    widths, strides = [8, 16, 16, 24, 24, 32], [1, 2, 1, 2, 1, 1]
    layers = [InvertedResidual(w_in, w, s) for w_in, w, s in zip([16] + widths[:-1], widths, strides)]
    return SDN(conv_bn(3, 16, 1), layers, [False, True, False, True, False, False], widths)


# --- SkipNet (Wang et al., ECCV 2018): a recurrent gate shared by all blocks --------------------------

class RNNGate(nn.Module):
    """SkipNet's RNNGatePolicy: an LSTM over the blocks' pooled features, one skip probability per block."""

    def __init__(self, c: int, hidden: int = 16):
        super().__init__()
        self.hidden_dim = hidden
        self.rnn = nn.LSTM(c, hidden)
        self.proj = nn.Linear(hidden, 1)

    def forward(self, x, h, c):
        out, (h, c) = self.rnn(x.unsqueeze(0), (h, c))  # a sequence of one step, as SkipNet feeds it
        prob = torch.sigmoid(self.proj(out.squeeze(0)))
        return prob, h, c


class SkipNetRNN(nn.Module):
    """SkipNet's RecurrentGatedResNet at inference: blocks registered as ``group{g}_layer{i}`` and
    reached by name, downsampling shortcuts kept in a dict; the gate after each block decides
    whether the next runs (a skipped block that changes the shape is replaced by its shortcut)."""

    def __init__(self, c: int = 16, num_layers=(2, 2)):
        super().__init__()
        self.num_layers = list(num_layers)
        self.conv1 = conv_bn(3, c)
        self.downsample = {}
        width = c
        for g, n in enumerate(self.num_layers):
            for i in range(n):
                stride, out = (2, 2 * width) if g and not i else (1, width)
                setattr(self, "group{}_layer{}".format(g, i), BasicBlock(width, out, stride))
                setattr(self, "group{}_gate{}".format(g, i), nn.Sequential(
                    nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(out, c)))
                if stride != 1:
                    ds = nn.Sequential(nn.Conv2d(width, out, 1, stride, bias=False), nn.BatchNorm2d(out))
                    setattr(self, "group{}_ds{}".format(g, i), ds)
                    self.downsample["group{}_ds{}".format(g, i)] = ds
                width = out
        self.control = RNNGate(c)
        self.fc = internal_classifier(width)
        self.threshold = 0.5

    def forward(self, x):
        x = self.conv1(x)
        h = torch.zeros(1, x.size(0), self.control.hidden_dim)
        c = torch.zeros(1, x.size(0), self.control.hidden_dim)
        mask, h, c = self.control(x.mean(dim=(2, 3)), h, c)
        for g in range(len(self.num_layers)):
            for i in range(self.num_layers[g]):
                ds_name = "group{}_ds{}".format(g, i)
                if mask > self.threshold:
                    x = getattr(self, "group{}_layer{}".format(g, i))(x)
                elif ds_name in self.downsample:
                    x = self.downsample[ds_name](x)
                gate_feature = getattr(self, "group{}_gate{}".format(g, i))(x)
                mask, h, c = self.control(gate_feature, h, c)
        return self.fc(x)

    def masks(self, x) -> list[float]:
        """The gate's outputs on `x` with every block run (to place the threshold)."""
        with torch.no_grad():
            x = self.conv1(x)
            h = c = torch.zeros(1, 1, self.control.hidden_dim)
            mask, h, c = self.control(x.mean(dim=(2, 3)), h, c)
            out = [float(mask)]
            for g, n in enumerate(self.num_layers):
                for i in range(n):
                    x = getattr(self, "group{}_layer{}".format(g, i))(x)
                    mask, h, c = self.control(getattr(self, "group{}_gate{}".format(g, i))(x), h, c)
                    out.append(float(mask))
        return out[:-1]

    def statistics(self, x):
        x = self.conv1(x)
        for g, n in enumerate(self.num_layers):
            for i in range(n):
                if "group{}_ds{}".format(g, i) in self.downsample:
                    self.downsample["group{}_ds{}".format(g, i)](x)
                x = getattr(self, "group{}_layer{}".format(g, i))(x)
        return self.fc(x)

    def calibrate(self, inputs):
        self.threshold = midpoint(m for x in inputs for m in self.masks(x))


# --- BlockDrop (Wu et al., CVPR 2018): a policy network picks the residual blocks to run -------------

class BlockDrop(nn.Module):
    """BlockDrop's FlatResNet at inference: a small ResNet agent gives one keep probability per
    block, thresholded into a policy; block ``t`` runs where ``policy[:, t]`` is set."""

    def __init__(self, c: int = 16, layer_config=(2, 2, 2)):
        super().__init__()
        self.layer_config = list(layer_config)
        self.agent = nn.Sequential(conv_bn(3, 8, 2), BasicBlock(8, 8), BasicBlock(8, 16, 2),
                                   nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, sum(layer_config)))
        self.seed = conv_bn(3, c)
        widths = [c * 2 ** s for s in range(len(layer_config))]
        self.ds = nn.ModuleList(nn.Sequential() if s == 0 else nn.Sequential(
            nn.Conv2d(widths[s - 1], widths[s], 1, 2, bias=False), nn.BatchNorm2d(widths[s]))
            for s in range(len(layer_config)))
        first = [c] + widths[:-1]  # a stage's first block changes the width and strides
        self.blocks = nn.ModuleList(
            nn.ModuleList(BasicBlock(widths[s] if b else first[s], widths[s], 2 if s and not b else 1)
                          for b in range(n)) for s, n in enumerate(layer_config))
        self.fc = internal_classifier(widths[-1])
        self.threshold = 0.5

    def forward(self, x):
        probs = torch.sigmoid(self.agent(x))
        policy = (probs > self.threshold).float()
        x = self.seed(x)
        t = 0
        for segment, num_blocks in enumerate(self.layer_config):
            for b in range(num_blocks):
                action = policy[:, t].contiguous()
                residual = self.ds[segment](x) if b == 0 else x
                if action.data.sum() == 0:
                    x = residual
                    t += 1
                    continue
                x = F.relu(residual + self.blocks[segment][b](x))
                t += 1
        return self.fc(x)

    def statistics(self, x):
        self.agent(x)
        x = self.seed(x)
        for blocks in self.blocks:
            for block in blocks:
                x = block(x)
        return self.fc(x)

    def calibrate(self, inputs):
        with torch.no_grad():
            probs = [p for x in inputs for p in torch.sigmoid(self.agent(x)).reshape(-1).tolist()]
        self.threshold = midpoint(probs)


# --- Show and Tell (Vinyals et al., CVPR 2015): CNN encoder, greedy LSTM decoding -------------------

class Captioner(nn.Module):
    """Show-and-Tell's `sample()`: the image features are the LSTM's first input (its state starts
    as None), each step feeds back the argmax word; the caption tensor grows by torch.cat (the
    code's list of words) and decoding stops at the end token."""

    def __init__(self, c: int = 16, embed: int = 16, hidden: int = 24, vocab: int = 12, max_len: int = 6):
        super().__init__()
        self.encoder = nn.Sequential(conv_bn(3, c, 2), conv_bn(c, 2 * c, 2), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                                     nn.Linear(2 * c, embed))
        self.embed = nn.Embedding(vocab, embed)
        self.lstm = nn.LSTM(embed, hidden, batch_first=True)
        self.linear = nn.Linear(hidden, vocab)
        self.max_seg_length = max_len
        self.end = 1

    def forward(self, images, states=None):
        features = self.encoder(images)
        sampled_ids = torch.zeros(features.size(0), 0, dtype=torch.long)
        inputs = features.unsqueeze(1)
        for _ in range(self.max_seg_length):
            hiddens, states = self.lstm(inputs, states)
            outputs = self.linear(hiddens.squeeze(1))
            _, predicted = outputs.max(1)
            sampled_ids = torch.cat([sampled_ids, predicted.unsqueeze(1)], 1)
            if predicted.item() == self.end:
                break
            inputs = self.embed(predicted).unsqueeze(1)
        return sampled_ids

    def statistics(self, images):
        return self.encoder(images)

    def calibrate(self, inputs):
        """The end token's logit is shifted so that half the captions end before the last step."""
        with torch.no_grad():
            best = []
            for x in inputs:
                states, step, margins = None, self.encoder(x).unsqueeze(1), []
                for _ in range(self.max_seg_length):
                    hiddens, states = self.lstm(step, states)
                    out = self.linear(hiddens.squeeze(1))
                    margins.append(float(out[0, self.end] - out[0].max()))  # 0 where the end token wins
                    step = self.embed(out.argmax(1)).unsqueeze(1)
                best.append(max(margins))
            self.linear.bias[self.end] -= midpoint(best)


# --- BERT-style early exit: DeeBERT (entropy) and PABEE (patience) ----------------------------------

class TinyBert(nn.Module):
    """Token embeddings, position embeddings and post-norm transformer layers, one classifier per layer."""

    def __init__(self, d: int = 32, heads: int = 2, layers: int = 4, classes: int = 4):
        super().__init__()
        self.embeddings = nn.Embedding(VOCAB, d)
        self.position = nn.Parameter(torch.randn(1, SEQ, d) * 0.5)
        self.layer = nn.ModuleList(nn.TransformerEncoderLayer(d, heads, 2 * d, dropout=0.0, batch_first=True)
                                   for _ in range(layers))
        self.highway = nn.ModuleList(nn.Sequential(nn.Linear(d, d), nn.Tanh(), nn.Linear(d, classes))
                                     for _ in range(layers))
        self.num_layers = layers

    def layer_logits(self, ids) -> list[torch.Tensor]:
        with torch.no_grad():
            h, out = self.embeddings(ids) + self.position, []
            for i in range(self.num_layers):
                h = self.layer[i](h)
                out.append(self.highway[i](h[:, 0]))
        return out

    def statistics(self, ids):
        return self.layer_logits(ids)


class DeeBert(TinyBert):
    """DeeBERT: a highway classifier after every layer; exit when its entropy is low enough."""

    def __init__(self, **kw):
        super().__init__(**kw)
        self.early_exit_entropy = 1.0

    def forward(self, input_ids):
        hidden_states = self.embeddings(input_ids) + self.position
        for i, layer_module in enumerate(self.layer):
            hidden_states = layer_module(hidden_states)
            logits = self.highway[i](hidden_states[:, 0])
            prob = F.softmax(logits, dim=-1)
            entropy = -torch.sum(prob * torch.log(prob), dim=-1)
            if entropy < self.early_exit_entropy:
                return logits
        return logits

    def calibrate(self, inputs):
        def entropy(z):
            p = F.softmax(z, -1)
            return float(-(p * torch.log(p)).sum())

        self.early_exit_entropy = midpoint(min(entropy(z) for z in self.layer_logits(x)[:-1]) for x in inputs)


class Pabee(TinyBert):
    """PABEE: stop when `patience` consecutive classifiers agree on the argmax (a host counter)."""

    def __init__(self, patience: int = 1, **kw):
        super().__init__(**kw)
        self.patience = patience

    def forward(self, input_ids):
        hidden_states = self.embeddings(input_ids) + self.position
        patient_counter = 0
        patient_result = None
        for i in range(self.num_layers):
            hidden_states = self.layer[i](hidden_states)
            logits = self.highway[i](hidden_states[:, 0])
            labels = logits.detach().argmax(dim=1)
            if patient_result is not None:
                patient_labels = patient_result.detach().argmax(dim=1)
            if (patient_result is not None) and torch.all(labels.eq(patient_labels)):
                patient_counter += 1
            else:
                patient_counter = 0
            patient_result = logits
            if patient_counter == self.patience:
                break
        return patient_result

    def calibrate(self, inputs):
        """Shift the classifiers' biases so that consecutive layers agree about half the time."""
        logits = [self.layer_logits(x) for x in inputs]
        with torch.no_grad():
            for i in range(self.num_layers):
                self.highway[i][-1].bias -= torch.cat([z[i] for z in logits]).mean(0)


# --- adaptive computation time over layers (Graves 2016; PALBERT's halting over BERT layers) ---------

class ActBert(TinyBert):
    """Layers run until the accumulated halting probability passes 1 - eps; the output is the
    halting-weighted state, the last layer weighted by the remainder (ACT's remainder trick)."""

    def __init__(self, **kw):
        super().__init__(**kw)
        self.halt = nn.Linear(self.position.shape[-1], 1)
        self.classifier = self.highway[-1]
        self.eps = 0.01

    def forward(self, input_ids):
        state = self.embeddings(input_ids) + self.position
        halting = torch.zeros(1)
        weighted = torch.zeros_like(state)
        n = 0
        while n < self.num_layers:
            state = self.layer[n](state)
            p = torch.sigmoid(self.halt(state[:, 0])).reshape(1)
            n += 1
            if halting + p >= 1 - self.eps:
                break
            halting = halting + p
            weighted = weighted + p * state
        weighted = weighted + (1 - halting) * state  # the remainder goes to the last layer run
        return self.classifier(weighted[:, 0])

    def totals(self, ids) -> float:
        with torch.no_grad():
            h, total = self.embeddings(ids) + self.position, 0.0
            for i in range(self.num_layers):
                h = self.layer[i](h)
                total += float(torch.sigmoid(self.halt(h[:, 0])))
        return total

    def calibrate(self, inputs):
        self.eps = 1 - midpoint(self.totals(x) for x in inputs)


# --- the suite ---------------------------------------------------------------------------------------

BUILDERS = {"sdn_vgg": sdn_vgg, "sdn_resnet": sdn_resnet, "sdn_wide_resnet": sdn_wide_resnet,
            "sdn_mobilenet": sdn_mobilenet, "skipnet_rnn": SkipNetRNN, "blockdrop": BlockDrop,
            "captioner": Captioner, "deebert": DeeBert, "pabee": Pabee, "act_bert": ActBert}
TEXT = {"deebert", "pabee", "act_bert"}


def inputs_for(name: str, n: int = 32, seed: int = 0) -> list[tuple]:
    """n example calls: images of varied scale and offset (so confidences vary), or token ids."""
    g = torch.Generator().manual_seed(seed)
    if name in TEXT:
        return [(torch.randint(0, VOCAB, (1, SEQ), generator=g),) for _ in range(n)]
    out = []
    for _ in range(n):
        scale = 0.25 + 1.75 * torch.rand(1, generator=g)
        out.append((torch.randn(IMAGE, generator=g) * scale + torch.randn(1, 3, 1, 1, generator=g) * 0.5,))
    return out


def build(name: str, seed: int = 0) -> nn.Module:
    """One network, batch norm recalibrated on random inputs, thresholds calibrated on `inputs_for`."""
    torch.manual_seed(seed)
    model = BUILDERS[name]()
    recalibrate_bn(model, inputs_for(name, 16, seed + 1000))
    model.calibrate([a[0] for a in inputs_for(name, seed=seed)])
    return model.eval()


def literature(seed: int = 0) -> dict[str, nn.Module]:
    return {name: build(name, seed) for name in BUILDERS}
