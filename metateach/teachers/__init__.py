"""Teachers, registered by name so that ``teacher.name`` in a config selects one.

============================  ==================================================  =================
``deep_interaction``          weights from the student's internal states          Fan et al. 2020
``meta_weight_net``           an MLP from loss to weight                          Shu et al. 2019
``learning_to_reweight``      weights from per-sample validation gradients        Ren et al. 2018
``l2t_dln``                   a dynamic loss network, updated by an LSTM teacher  Hai et al. 2023
``l2t_dlf``                   loss coefficients from the student's state          Wu et al. 2018
``co_teaching``               a peer network; each learns from the other's        Han et al. 2018
                              small-loss samples (SRIT: with ``optim.sam.rho``)
``l2t``                       a data filter trained by REINFORCE to speed up      Fan et al. 2018
                              reaching a target accuracy
``mentornet_pd``              a predefined curriculum on loss against its         Jiang et al. 2018
                              running percentile (MentorNet-PD)
``mentornet_dd``              a curriculum fitted to a record of training with    Jiang et al. 2018
                              known labels (MentorNet-DD)
``lr_schedule``               the optimizer's learning rate over the run, a       Maclaurin et al. 2015
                              learned piecewise-linear curve
``lr_controller``             the learning rate's scale from the student's        (this library)
                              state: loss history, gradient norm (a small MLP)
``weight_decay``              the optimizer's weight decay, learned per group     Maclaurin et al. 2015
                              of the student's parameters
``focal``                     the focal loss                                      Lin et al. 2017
``label_smoothing``           cross-entropy on labels mixed with uniform          Szegedy et al. 2016
``large_margin_softmax``      cross-entropy with an angular margin (L-Softmax)    Liu et al. 2016
``adaptive_robust_loss``      Barron's robust loss, its shape learned with the    Barron 2019
                              student
``self_paced``                easy samples first, a growing hardness threshold    Kumar et al. 2010
``random_filter``             keep each sample with a fixed probability (RandTeach)  Fan et al. 2018
``constant``                  all weights one (the engine's probe and baseline)
``none``                      no teacher: the baseline every paper compares against
============================  ==================================================  =================
"""

from __future__ import annotations

from metateach.registry import TEACHERS
from metateach.teachers.co_teaching import CoTeaching
from metateach.teachers.constant import ConstantTeacher
from metateach.teachers.deep_interaction import DeepInteractionTeacher
from metateach.teachers.dynamic_loss import DynamicLossNetwork, DynamicLossTeacher
from metateach.teachers.dynamic_loss_function import DynamicLossFunctionTeacher
from metateach.teachers.focal import FocalLoss
from metateach.teachers.l2t import L2TFilter
from metateach.teachers.label_smoothing import LabelSmoothing
from metateach.teachers.large_margin import LargeMarginSoftmax
from metateach.teachers.learning_to_reweight import LearningToReweight
from metateach.teachers.mentornet import MentorNetDD, MentorNetPD
from metateach.teachers.meta_weight_net import MetaWeightNet
from metateach.teachers.random_filter import RandomFilter
from metateach.teachers.robust_loss import AdaptiveRobustLoss
from metateach.teachers.self_paced import SelfPacedLearning
from metateach.teachers.step_settings import (
    LearnedWeightDecay,
    LearningRateController,
    LearningRateSchedule,
)

__all__ = [
    "AdaptiveRobustLoss",
    "CoTeaching",
    "ConstantTeacher",
    "DeepInteractionTeacher",
    "DynamicLossFunctionTeacher",
    "DynamicLossNetwork",
    "DynamicLossTeacher",
    "FocalLoss",
    "L2TFilter",
    "LabelSmoothing",
    "LargeMarginSoftmax",
    "LearnedWeightDecay",
    "LearningRateController",
    "LearningRateSchedule",
    "LearningToReweight",
    "MentorNetDD",
    "MentorNetPD",
    "MetaWeightNet",
    "RandomFilter",
    "SelfPacedLearning",
    "no_teacher",
]


@TEACHERS.register("none")
def no_teacher() -> None:
    """No teacher: plain training on the (possibly noisy) labels."""
    return None
