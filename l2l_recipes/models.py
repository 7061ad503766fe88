"""The Conv4 networks of the few-shot literature, as learn2learn builds them."""
import learn2learn as l2l

from l2l_recipes import data


def conv4_classifier(dataset, ways, hidden_size):
    """MAML's Conv4 classifier (`.features`, `.classifier`): on Omniglot 4 x [3x3 conv stride 2, batch
    norm, ReLU], mean-pooled (OmniglotCNN); else 4 x [3x3 conv, batch norm, ReLU, 2x2 max-pool]."""
    if dataset.startswith("omniglot"):  # also omniglot-binary
        return l2l.vision.models.OmniglotCNN(output_size=ways, hidden_size=hidden_size)
    module = data.dataset_module(dataset)
    side = module.SIZE // 16  # after four 2x2 max-pools
    return l2l.vision.models.CNN4(output_size=ways, hidden_size=hidden_size, channels=module.CHANNELS,
                                  max_pool=True, embedding_size=hidden_size * side * side)


def conv4_embedding(dataset, hidden_size):
    """Prototypical Networks' Conv4 embedding: 4 x [3x3 conv, batch norm, ReLU, 2x2 max-pool]."""
    channels = data.dataset_module(dataset).CHANNELS
    return l2l.vision.models.CNN4Backbone(hidden_size=hidden_size, channels=channels, max_pool=True, layers=4)


def conv4_embedding_size(dataset, hidden_size):
    """Length of conv4_embedding's output: hidden_size x (side / 16)^2 (28 -> 1, 84 -> 5, 32 -> 2)."""
    return hidden_size * (data.dataset_module(dataset).SIZE // 16) ** 2
