from plugtune.training.loop import FitResult, NonFiniteLossError, evaluate_loss, fit
from plugtune.training.objectives import CausalLMObjective, Objective
from plugtune.training.run import TrainReport, prepare_model, train

__all__ = ["CausalLMObjective", "FitResult", "NonFiniteLossError", "Objective", "TrainReport", "evaluate_loss",
           "fit", "prepare_model", "train"]
