"""A stateful view inside AGIFORMER for interpretability (docs/transparency.md): the residual stream between
blocks, every attention head of every branch, FFN neurons, the logit lens and the information-flow graph.

    from agiformer.transparency import AgiformerTransparentLlm
    llm = AgiformerTransparentLlm("runs/tiny/last.pt")
    llm.run(["def main():\\n    return 0\\n"])
    llm.attention_matrix(0, layer=1, head=5)          # [patches, patches]

``python -m agiformer.transparency CHECKPOINT --prompt ... -o graph.png`` draws the contribution graph
(needs the ``graph`` extra).
"""

from .graph import Contributions, contributions, edges, neuron_contributions, paths_to_prediction, to_networkx
from .interface import ModelInfo, TransparentLlm
from .model import AgiformerTransparentLlm, Head

__all__ = ["AgiformerTransparentLlm", "Contributions", "Head", "ModelInfo", "TransparentLlm", "contributions",
           "edges", "neuron_contributions", "paths_to_prediction", "to_networkx"]
