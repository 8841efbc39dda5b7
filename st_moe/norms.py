"""Pre-norm sublayers for the stability study: RMSNorm without its learned scale.

The paper's stability study (ST-MoE, arXiv 2202.08906, Sec. 3.1, "remove RMSNorm scale") drops the
multiplicative scale parameter of every RMSNorm. mesh_tensorflow's `transformer.sublayer_rms_norm`
always creates `scale`; this sublayer computes the same normalisation without it, so a run file can
swap it in for every pre-norm and final norm:

  transformer.LayerStack.sublayers_per_layer = [@st_moe.sublayer_rms_norm_no_scale, ...]
"""
import gin
import mesh_tensorflow as mtf


@gin.configurable(module="st_moe")
def sublayer_rms_norm_no_scale(x, layer_stack, context, epsilon=1e-6):
  """x / sqrt(mean(x^2 over d_model) + epsilon), no learned scale.

  Args:
    x: <activation dtype>[B..., L, M] mtf.Tensor.
    layer_stack: the LayerStack (unused; the sublayer signature of mesh_tensorflow).
    context: a transformer Context (gives the model dimension M).
    epsilon: added to the mean square.

  Returns:
    mtf.Tensor of the shape of x.
  """
  del layer_stack
  if not epsilon > 0:
    raise ValueError(f"sublayer_rms_norm_no_scale epsilon={epsilon!r}: must be > 0, e.g. 1e-6")
  model_dim = context.model.model_dim
  variance = mtf.reduce_mean(mtf.square(x), reduced_dim=model_dim)
  return x * mtf.rsqrt(variance + epsilon)
