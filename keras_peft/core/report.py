"""`Report`: what `keras_peft.apply` changed and how many parameters train."""

import dataclasses
import math


def count_parameters(variables):
    return int(sum(math.prod(v.shape) for v in variables))


@dataclasses.dataclass
class Report:
    """Summary of the PEFT methods applied to a model.

    Attributes:
        model_name: name of the model.
        methods: `repr` of each applied method, in order.
        adapted_paths: `{method repr: [layer paths]}`, what each method changed.
        head_paths: paths of task-head layers that stay trainable.
        trainable_variables: `{variable key: parameter count}` of every
            variable that trains.
        trainable_parameters: parameters that train.
        total_parameters: all parameters of the model, adapters included.
    """

    model_name: str
    methods: list
    adapted_paths: dict
    head_paths: list
    trainable_variables: dict
    trainable_parameters: int
    total_parameters: int

    @property
    def trainable_fraction(self):
        """Share of parameters that train, between 0 and 1."""
        if self.total_parameters == 0:
            return 0.0
        return self.trainable_parameters / self.total_parameters

    def __str__(self):
        lines = [f"keras_peft report for {self.model_name!r}"]
        for method in self.methods:
            paths = self.adapted_paths.get(method, [])
            lines.append(f"  {method}: {len(paths)} layer(s)")
            lines.extend(f"    {path}" for path in paths)
        if self.head_paths:
            lines.append(f"  task head (trainable): {len(self.head_paths)} layer(s)")
            lines.extend(f"    {path}" for path in self.head_paths)
        lines.append(
            f"  trainable parameters: {self.trainable_parameters:,} of "
            f"{self.total_parameters:,} ({100 * self.trainable_fraction:.4f}%)"
        )
        return "\n".join(lines)
