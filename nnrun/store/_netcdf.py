"""NetCDF-4 dimensions for an output file, so xarray opens it as it is.

`xarray.open_dataset(path, engine="h5netcdf", group="saves")` and `open_datatree`
read HDF5 dimension scales as netCDF dimensions: every axis of every variable needs
one (a variable with some axes labelled and some not is rejected), the dimension's
name is the scale's name, and its scale must sit in the variable's group or above.

Prompt, layer, step and token axes already have label scales under /axes/<save>/;
the value's own axes (k, hidden, vocab, dim0, ...) have none. So every axis of every
dataset outside /axes also gets a data-less dimension scale in the root group, named
after the axis. A dimension name has one size per file: where datasets give the same
axis different sizes (a save over two of six prompts), the size most of them use keeps
the plain name and the others are named `<axis>.<save>` (`prompt.vector`); a name that
is also a dataset's (a save called `hidden`) becomes `<axis>_axis`.
"""

from __future__ import annotations

from collections import Counter

import h5py

# What netCDF-4 writes into a dimension scale that is not also a variable; h5netcdf
# hides such scales from the variables it lists.
NOT_A_VARIABLE = "This is a netCDF dimension but not a netCDF variable."


def add_netcdf_dimensions(file: h5py.File) -> None:
    """Give every axis of every dataset a netCDF dimension (see the module docstring).

    Safe to call again on a file that grew (a resumed run): earlier dimensions are
    detached and replaced.
    """
    remove_netcdf_dimensions(file)
    uses: list[tuple[h5py.Dataset, int, str, int, str]] = []  # dataset, axis, label, size, owner
    groups: dict[str, h5py.Group] = {}  # parent path -> group (h5py lookups cost: reuse)
    scales: dict[tuple[str, str], h5py.Dataset | None] = {}

    def beside(parent: str, label: str) -> h5py.Dataset | None:
        """The label scale in the dataset's own group, if there is one."""
        if (parent, label) not in scales:
            if parent not in groups:
                groups[parent] = file[parent]
            found = groups[parent].get(label)
            scales[(parent, label)] = (
                found if isinstance(found, h5py.Dataset) and found.is_scale else None
            )
        return scales[(parent, label)]

    def visit(path: str, obj: object) -> None:
        if "/" not in path or not isinstance(obj, h5py.Dataset) or obj.is_scale:
            return  # root-level datasets are the dimensions themselves
        parent, name = path.rsplit("/", 1)
        owner = str(obj.attrs.get("save", name))
        shape = obj.shape
        dims = obj.dims
        for axis in range(len(shape)):
            label = dims[axis].label or f"{name}_dim{axis}"
            local = beside(parent, label)
            if local is not None and local.shape[0] == shape[axis]:
                # A label scale beside it (/axes/<save>/length over /axes/<save>/prompt).
                if len(dims[axis]) == 0:
                    dims[axis].attach_scale(local)
                continue
            uses.append((obj, axis, label, shape[axis], owner))

    file.visititems(visit)
    # A dimension and a variable of one name are one coordinate variable to netCDF:
    # a save called `hidden` must not meet a dimension `hidden`.
    taken = {ds.name.rsplit("/", 1)[-1] for ds, *_ in uses}
    # The plain name goes to the size most datasets give the axis (the first seen on a tie).
    counts: dict[str, Counter[int]] = {}
    for _, _, label, size, _ in uses:
        counts.setdefault(label, Counter())[size] += 1
    plain = {label: sizes.most_common(1)[0][0] for label, sizes in counts.items()}
    for ds, axis, label, size, owner in uses:
        name = label if plain[label] == size else f"{label}.{owner}"
        if name in taken:
            name = f"{name}_axis"
        if name in file and not _is_dimension(file[name], size):
            name = f"{name}.dim"  # never clash with a group of the file (prompts, saves, ...)
        if name not in file:
            scale = file.create_dataset(name, shape=(size,), dtype="i4")  # no data is stored
            scale.make_scale(f"{NOT_A_VARIABLE}{size:10d}")
        # Attached last: netCDF readers take a dimension's last scale as its name.
        ds.dims[axis].attach_scale(file[name])


def remove_netcdf_dimensions(file: h5py.File) -> None:
    """Detach and delete the dimensions `add_netcdf_dimensions` made."""
    old = [k for k, v in file.items() if isinstance(v, h5py.Dataset) and _ours(v)]
    if not old:
        return

    def detach(_: str, obj: object) -> None:
        if isinstance(obj, h5py.Dataset) and not obj.is_scale:
            for axis in range(obj.ndim):
                for scale in list(obj.dims[axis].values()):
                    if scale.parent == file and _ours(scale):
                        obj.dims[axis].detach_scale(scale)

    file.visititems(detach)
    for name in old:
        del file[name]


def _ours(ds: h5py.Dataset) -> bool:
    name = ds.attrs.get("NAME", b"")
    return ds.is_scale and NOT_A_VARIABLE in (name.decode() if isinstance(name, bytes) else name)


def _is_dimension(obj: object, size: int) -> bool:
    return isinstance(obj, h5py.Dataset) and obj.is_scale and obj.shape == (size,)
