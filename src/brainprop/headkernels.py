"""The Triton kernels of :mod:`brainprop.fusedhead`, in a module of their own because Triton
resolves a kernel's names among its module's globals, and importing Triton (about a second)
is only worth it where the kernels run: imported on their first use.
"""

import triton
import triton.language as tl
from triton.language.extra import libdevice


@triton.jit
def _log(x, INTERPRETED: tl.constexpr):
    # libdevice's logf is what PyTorch's CUDA log computes; tl.log is a faster approximation,
    # whose noise would change a few exploratory choices. The interpreter has only tl.log.
    if INTERPRETED:
        return tl.log(x)
    return libdevice.log(x)


# Not specialised on the sizes: a batch of 1 (or a multiple of 16) would compile again, and
# Triton would make such a size a constant, without the methods a scalar argument has.
@triton.jit(do_not_specialize=["q_row_stride", "rows", "classes"])
def choose(
    q_ptr,
    q_row_stride,
    y_ptr,
    explore_ptr,
    uniform_ptr,
    actions_ptr,
    explored_ptr,
    rewards_ptr,
    errors_ptr,
    loss_ptr,
    rows,
    classes,
    epsilon,
    tiny,
    EXPLORE: tl.constexpr,
    INTERPRETED: tl.constexpr,
    BLOCK_ROWS: tl.constexpr,
    BLOCK_CLASSES: tl.constexpr,
):
    cols = tl.arange(0, BLOCK_CLASSES)
    col_in = cols < classes
    squares = tl.zeros([BLOCK_ROWS], dtype=tl.float32)
    for start in range(0, rows, BLOCK_ROWS):
        r = start + tl.arange(0, BLOCK_ROWS)
        row_in = r < rows
        inside = row_in[:, None] & col_in[None, :]
        q = tl.load(q_ptr + r[:, None] * q_row_stride + cols[None, :], mask=inside, other=0.0)
        score = q
        if EXPLORE:
            explored = tl.load(explore_ptr + r, mask=row_in, other=1.0) < epsilon
            u = tl.load(uniform_ptr + r[:, None] * classes + cols[None, :], mask=inside, other=0.5)
            noisy = q - _log(-_log(tl.maximum(u, tiny), INTERPRETED), INTERPRETED)
            score = tl.where(explored[:, None], noisy, q)
        else:
            explored = r < 0
        tl.store(explored_ptr + r, explored.to(tl.int8), mask=row_in)
        # torch.argmax takes NaN for the largest value, and the first one it meets.
        nan = (score != score) & inside
        any_nan = tl.max(nan.to(tl.int32), axis=1) > 0
        first_nan = tl.argmax(nan.to(tl.int32), axis=1, tie_break_left=True)
        score = tl.where(inside & ~nan, score, float("-inf"))
        action = tl.where(any_nan, first_nan, tl.argmax(score, axis=1, tie_break_left=True))
        q_chosen = tl.load(q_ptr + r * q_row_stride + action, mask=row_in, other=0.0)
        label = tl.load(y_ptr + r, mask=row_in, other=-1)
        reward = (action == label).to(tl.float32)
        error = reward - q_chosen
        tl.store(actions_ptr + r, action.to(tl.int64), mask=row_in)
        tl.store(rewards_ptr + r, reward, mask=row_in)
        tl.store(errors_ptr + r, error, mask=row_in)
        squares += tl.where(row_in, error * error, 0.0)
    tl.store(loss_ptr, 0.5 * (tl.sum(squares, axis=0) / rows))


@triton.jit(do_not_specialize=["rows", "classes"])
def spread(
    grad_ptr,
    actions_ptr,
    errors_ptr,
    out_ptr,
    rows,
    classes,
    INTERPRETED: tl.constexpr,
    BLOCK_ROWS: tl.constexpr,
    BLOCK_CLASSES: tl.constexpr,
):
    r = tl.program_id(0) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
    cols = tl.arange(0, BLOCK_CLASSES)
    row_in = r < rows
    inside = row_in[:, None] & (cols < classes)[None, :]
    # The unfused head's scale, grad / -B (autograd's -(fl(fl(g * 0.5) / B) * 2e), as halving
    # and doubling are exact), as PyTorch computes it on the kernels' device: on CUDA a tensor
    # divided by a number is multiplied by the number's reciprocal, rounded to fp32 on the host
    # (BinaryDivTrueKernel.cu); the CPU divides. Both correctly rounded, as here.
    grad = tl.load(grad_ptr)
    if INTERPRETED:
        scale = tl.math.div_rn(grad, -rows.to(tl.float32))
    else:
        scale = grad * tl.math.div_rn(1.0, -rows.to(tl.float32))
    action = tl.load(actions_ptr + r, mask=row_in, other=-1)
    # + 0.0: autograd adds the chosen value to zeros, which turns a -0.0 into +0.0.
    value = tl.load(errors_ptr + r, mask=row_in, other=0.0) * scale + 0.0
    out = tl.where(cols[None, :] == action[:, None], value[:, None], 0.0)
    tl.store(out_ptr + r[:, None] * classes + cols[None, :], out, mask=inside)
