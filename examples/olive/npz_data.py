"""An Olive dataset for the SmoeOpt pass's ``data_config``: the samples of an .npz whose
arrays are the model's inputs (first axis = samples), e.g. ``input_ids``, ``attention_mask``
and ``position_ids`` of the bundled LM. Each item is ``(inputs, label)`` as Olive's
dataloaders expect; the label is unused."""
import numpy as np
from olive.data.registry import Registry


@Registry.register_dataset()
def npz_inputs(data_dir=None, path=None, max_samples=None, **kwargs):
    """The samples of ``path`` (relative paths are taken from ``data_dir`` when given)."""
    if path is None:
        raise ValueError("npz_inputs needs params.path, an .npz of the model's inputs")
    if data_dir is not None:
        path = f"{data_dir}/{path}"
    with np.load(path) as npz:
        arrays = {name: npz[name] for name in npz.files}
    count = min(len(a) for a in arrays.values())
    if max_samples is not None:
        count = min(count, int(max_samples))
    return [({name: a[i] for name, a in arrays.items()}, 0) for i in range(count)]
