"""Online preference optimisation tasks: the policy samples, an annotator labels, a DAA loss trains, all in
the one training loop (:mod:`diffdpo.train`). A package of its own because it composes a modality
(:mod:`diffdpo.lm`) with annotators (:mod:`diffdpo.rewards`) and evaluation (:mod:`diffdpo.eval`), which
themselves import :mod:`diffdpo.lm`; inside ``diffdpo/lm`` it would close an import cycle."""
