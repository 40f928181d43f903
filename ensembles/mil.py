"""Attention multiple-instance pooling: a patient's score from its cells' embeddings.

The gated attention of Ilse et al. (2018, "Attention-based deep multiple instance
learning"), as SCEMILA (Hehr et al. 2023) used it for leukaemia from single-cell blood
images: each cell's embedding ``h`` (a frozen backbone's, :mod:`cnn.embeddings`) gets a
weight ``a = softmax_cells(w . (tanh(V h) * sigmoid(U h)))``, the bag is ``z = sum a h``,
and a logistic layer scores ``z``. The cells the weights favour are the ones the call
rests on (:meth:`AttentionMIL.attention`).

Only bags given to :meth:`AttentionMIL.fit` are seen: the caller keeps test bags out.
The embeddings are standardised and reduced by PCA fitted on the training bags' cells
(a few dozen bags cannot fit a 1,280-wide attention layer); the net is trained on whole
bags, full batch, with balanced class weights, L2 and dropout, a fixed number of epochs.
"""

from __future__ import annotations

import numpy as np
from sklearn.decomposition import PCA
from sklearn.preprocessing import StandardScaler


class AttentionMIL:
    """Gated-attention MIL over per-cell embeddings. ``fit(bags, y)``: ``bags`` a list of
    (n_cells, D) arrays, ``y`` 1 for positive bags; ``score(bags)``: positive
    probabilities."""

    name = "attention"
    needs_fit = True
    needs_embeddings = True  # pools a backbone's cell embeddings, not cell probabilities
    settings: dict[str, str] = {"seed": "seed"}

    def __init__(
        self,
        components: int = 64,
        hidden: int = 32,
        dropout: float = 0.25,
        l2: float = 1e-3,
        epochs: int = 150,
        learning_rate: float = 3e-3,
        seed: int = 0,
    ):
        self.components, self.hidden, self.dropout = components, hidden, dropout
        self.l2, self.epochs, self.learning_rate, self.seed = l2, epochs, learning_rate, seed

    def params(self) -> dict:
        return {
            k: getattr(self, k)
            for k in ("components", "hidden", "dropout", "l2", "epochs", "learning_rate")
        }

    # -- data -------------------------------------------------------------------------
    def _reduce(self, bags):
        return [
            self.pca_.transform(self.scaler_.transform(np.asarray(b, np.float32))).astype(
                np.float32
            )
            for b in bags
        ]

    @staticmethod
    def _pad(bags):
        n = max(len(b) for b in bags)
        d = bags[0].shape[1]
        X = np.zeros((len(bags), n, d), np.float32)
        M = np.zeros((len(bags), n), np.float32)
        for i, b in enumerate(bags):
            X[i, : len(b)], M[i, : len(b)] = b, 1.0
        return X, M

    # -- model ------------------------------------------------------------------------
    def _build(self, d: int):
        import keras
        from keras import layers, ops

        x_in = keras.Input((None, d))
        m_in = keras.Input((None,))
        reg = keras.regularizers.l2(self.l2)
        h = layers.Dense(self.hidden, activation="relu", kernel_regularizer=reg)(x_in)
        v = layers.Dense(self.hidden, activation="tanh", kernel_regularizer=reg)(h)
        u = layers.Dense(self.hidden, activation="sigmoid", kernel_regularizer=reg)(h)
        logits = ops.squeeze(
            layers.Dense(
                1,
                kernel_initializer="zeros",  # starts as the mean
                kernel_regularizer=reg,
            )(v * u),
            -1,
        )
        logits = ops.where(m_in > 0, logits, -1e9)
        a = ops.softmax(logits, axis=-1)
        z = ops.sum(a[..., None] * h, axis=1)
        out = layers.Dense(1, activation="sigmoid", kernel_regularizer=reg)(
            layers.Dropout(self.dropout)(z)
        )
        return keras.Model([x_in, m_in], out), keras.Model([x_in, m_in], a)

    def fit(self, bags: list[np.ndarray], y) -> "AttentionMIL":
        import keras

        y = np.asarray(y).astype(np.float32)
        if len(np.unique(y)) < 2:
            raise ValueError("attention MIL needs positive and negative bags")
        keras.utils.set_random_seed(int(self.seed))
        cells = np.concatenate([np.asarray(b, np.float32) for b in bags])
        self.scaler_ = StandardScaler().fit(cells)
        k = int(min(self.components, cells.shape[1], len(cells) - 1))
        self.pca_ = PCA(k, random_state=int(self.seed)).fit(self.scaler_.transform(cells))
        X, M = self._pad(self._reduce(bags))
        self.model_, self.attention_model_ = self._build(X.shape[-1])
        pos = float(y.mean())
        weights = np.where(y == 1, 0.5 / pos, 0.5 / (1 - pos)).astype(np.float32)
        _train(self.model_, X, M, y, weights, int(self.epochs), float(self.learning_rate))
        return self

    def score(self, bags: list[np.ndarray]) -> np.ndarray:
        X, M = self._pad(self._reduce(bags))
        return np.asarray(self.model_([X, M], training=False)).reshape(-1)

    def attention(self, bag: np.ndarray) -> np.ndarray:
        """The weight of each of a bag's cells (they sum to one)."""
        X, M = self._pad(self._reduce([bag]))
        return np.asarray(self.attention_model_([X, M], training=False))[0]


def _train(model, X, M, y, weights, epochs: int, learning_rate: float) -> None:
    """Full-batch Adam on the weighted binary cross-entropy plus the L2 terms, one
    compiled step per epoch (Keras' ``fit`` costs more per epoch than this net's step)."""
    import keras
    import tensorflow as tf

    opt = keras.optimizers.Adam(learning_rate)
    X, M, y, w = (tf.constant(v) for v in (X, M, y, weights))
    variables = model.trainable_variables

    @tf.function
    def step():
        with tf.GradientTape() as tape:
            p = tf.clip_by_value(tf.reshape(model([X, M], training=True), [-1]), 1e-6, 1 - 1e-6)
            bce = -(y * tf.math.log(p) + (1 - y) * tf.math.log(1 - p))
            loss = tf.reduce_sum(w * bce) / tf.reduce_sum(w) + tf.add_n(
                [tf.constant(0.0)] + list(model.losses)
            )
        opt.apply_gradients(zip(tape.gradient(loss, variables), variables))
        return loss

    for _ in range(epochs):
        step()


__all__ = ["AttentionMIL"]
