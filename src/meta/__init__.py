"""Meta-learning and pairwise methods, each usable as an inference head (see src/stages/meta.py).

    method = META_METHODS.get("relation")(cfg.meta, body, device)
    method.setup(); meta_train(method, sampler, bank, seed)
    probs = method.predict(support_x, support_y, query_x, n_classes)   # float32 (Q, C)

Registered: siamese, siamese_triplet (Koch et al. 2015), relation (Sung et al. 2018),
protonet_episodic (Snell et al. 2017), maml and fomaml (Finn et al. 2017), reptile (Nichol et al.
2018), metasgd (Li et al. 2017).
"""
from src.registry import Registry

META_METHODS = Registry("meta method")

# Register the methods (imports at the bottom: the modules import META_METHODS from here).
from src.meta import maml, protonet, relation, siamese  # noqa: E402,F401
