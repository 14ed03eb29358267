"""Sharding rules from the config, batch shards, and the active mesh as JAX's
context mesh."""

import jax
import jax.numpy as jnp
import ml_collections
import pytest
from jax.sharding import PartitionSpec as P

from hybridna_jax import sharding
from hybridna_jax.config import base_config


def test_config_rules_default_to_the_default_rules():
  assert base_config().mesh.rules == ()
  assert sharding.rules_from_config(base_config().mesh) == sharding.DEFAULT_RULES
  # Run configs written before the field existed.
  assert (
    sharding.rules_from_config(ml_collections.ConfigDict(dict(data=1, fsdp=-1, tensor=1)))
    == sharding.DEFAULT_RULES
  )


def test_config_rules_override():
  mesh_config = base_config().mesh
  mesh_config.rules = (("embed", None), ("act_length", "tensor"), ("classes", ("data", "fsdp")))
  rules = dict(sharding.rules_from_config(mesh_config))
  assert rules["embed"] is None and rules["act_length"] == "tensor"
  assert rules["classes"] == ("data", "fsdp")
  assert rules["mlp"] == "tensor"  # untouched default
  mesh = sharding.make_mesh(data=1, fsdp=4, tensor=2)
  table = tuple(rules.items())
  assert sharding.logical_to_spec(("embed", "mlp"), mesh, table, (64, 128)) == P(None, "tensor")
  assert sharding.logical_to_spec(("embed", "mlp"), mesh, sharding.DEFAULT_RULES, (64, 128)) == P(
    "fsdp", "tensor"
  )
  # JSON round trips (a run's config.json) give lists.
  mesh_config = ml_collections.ConfigDict(dict(rules=[["embed", None], ["classes", ["data"]]]))
  assert dict(sharding.rules_from_config(mesh_config))["classes"] == ("data",)
  # A name the model does not use (a typo) would change nothing: refused.
  mesh_config.rules = (("embedd", None),)
  with pytest.raises(ValueError, match=r"^config.mesh.rules: 'embedd' is no logical axis"):
    sharding.rules_from_config(mesh_config)


@pytest.mark.parametrize(
  "bad",
  [
    "embed",  # not pairs
    (("embed",),),  # not a pair
    ((1, "fsdp"),),  # name not a string
    (("embed", "model"),),  # unknown mesh axis
    (("embed", ("fsdp", "model")),),
    (("embed", ()),),
    (("embed", ("fsdp", "fsdp")),),  # an axis twice: JAX's error would not name the field
  ],
)
def test_config_rules_errors_name_the_field(bad):
  mesh_config = ml_collections.ConfigDict(dict(rules=bad))
  with pytest.raises(
    ValueError,
    match=r"config\.mesh\.rules must be a tuple of "
    r"\(logical_name, mesh_axis",
  ) as info:
    sharding.rules_from_config(mesh_config)
  assert "\n" not in str(info.value)


def test_batch_shards():
  assert sharding.batch_shards(sharding.make_mesh(data=2, fsdp=2, tensor=2)) == 4
  assert sharding.batch_shards(sharding.make_mesh(data=1, fsdp=1, tensor=8)) == 1
  assert sharding.batch_shards(sharding.make_mesh(data=8, fsdp=1, tensor=1)) == 8


def test_activate_enters_jax_context_mesh():
  mesh = sharding.make_mesh(data=2, fsdp=2, tensor=2)
  assert sharding.current() is None and jax.sharding.get_abstract_mesh().empty
  seen = {}

  def fn(x):
    with sharding.activate(mesh, sharding.DEFAULT_RULES):
      seen["jax"] = jax.sharding.get_abstract_mesh()
      seen["ours"] = sharding.current()
      return sharding.constrain(x, ("act_batch", None))

  jaxpr = str(jax.make_jaxpr(fn)(jnp.zeros((8, 4))))
  assert seen["jax"] == mesh.abstract_mesh and seen["ours"].mesh is mesh
  assert "sharding_constraint" in jaxpr
  assert sharding.current() is None and jax.sharding.get_abstract_mesh().empty


def test_jit_retraces_under_another_mesh():
  """jit keys its cache on JAX's context mesh, which `activate` sets."""
  traces = []

  @jax.jit
  def fn(x):
    traces.append(sharding.current())
    return sharding.constrain(x, ("act_batch", None))

  x = jnp.zeros((8, 4))
  fn(x)
  for mesh in (sharding.make_mesh(2, 2, 2), sharding.make_mesh(8, 1, 1)):

    def outer(x):
      with sharding.activate(mesh):  # noqa: B023 (traced at once)
        return fn(x)

    jax.make_jaxpr(outer)(x)
  assert [None if t is None else dict(t.mesh.shape) for t in traces] == [
    None,
    {"data": 2, "fsdp": 2, "context": 1, "tensor": 2},
    {"data": 8, "fsdp": 1, "context": 1, "tensor": 1},
  ]


def test_maybe_activate():
  mesh = sharding.make_mesh(data=2, fsdp=2, tensor=2)
  with sharding.maybe_activate(None):
    assert sharding.current() is None
  with sharding.maybe_activate(sharding.make_mesh(1, 1, 1, devices=jax.devices()[:1])):
    assert sharding.current() is None  # one device: nothing to shard
  with sharding.maybe_activate(mesh):
    assert sharding.current().mesh is mesh
  assert sharding.current() is None
