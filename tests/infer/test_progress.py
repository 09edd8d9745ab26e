"""Progress from the first second: a "compiling ..." line with the elapsed time while each fit
compiles (FOCEI, SAEM, NUTS, SVI with ``progress=True``), nothing with ``progress=False``."""

import io
import random
import re
import time

import jax
import jax.numpy as jnp
import numpyro
import numpyro.distributions as dist
import pytest

import nlmegen
from nlmegen.infer.shared.progress import compiling


class _Terminal(io.StringIO):
    def isatty(self):
        return True


def test_compiling_line_updates_every_second_and_ends_with_the_time():
    out = _Terminal()
    with compiling("the thing", stream=out):
        time.sleep(2.3)
    text = out.getvalue()
    lines = [part for part in text.split("\r") if part]
    assert lines[:3] == [f"compiling the thing ... {k} s" for k in (0, 1, 2)], lines  # at 0.5 s, then each second
    assert re.search(r"\rcompiled the thing in 2\.\d s\n$", text)
    quick, off = _Terminal(), _Terminal()
    with compiling("a cached program", stream=quick):
        time.sleep(0.05)  # ends before the first line is due (0.5 s): a cache hit prints nothing
    with compiling("anything", False, stream=off):
        time.sleep(0.7)
    assert quick.getvalue() == "" and off.getvalue() == ""


def test_a_log_file_gets_whole_lines():
    """Not a terminal (CI logs, `nlmegen demo > log`): no carriage returns, one line at the start, one at the end."""
    out = io.StringIO()
    with compiling("the thing", stream=out):
        time.sleep(1.7)
    text = out.getvalue()
    assert "\r" not in text
    assert re.fullmatch(r"compiling the thing \.\.\.\ncompiled the thing in 1\.\d s\n", text), text


# a constant new in every process: the fits' programs are then in no persistent cache (CI keeps its cache
# directory between runs, where a cache hit compiles in under the 0.5 s before a "compiling" line shows)
_KA = 1.5 + random.SystemRandom().random() * 1e-6


def _model(pop):  # a model of this module only
    tcl = numpyro.sample("tcl", dist.Normal(1.0, 1.0))
    tv = numpyro.sample("tv", dist.Normal(3.5, 1.0))
    omega = numpyro.sample("omega", dist.HalfNormal(1.0))
    sd = numpyro.sample("sd", dist.HalfNormal(2.0))
    with nlmegen.subjects(pop):
        eta = numpyro.sample("eta", dist.Normal(0.0, omega))
        conc = nlmegen.pk.one_cmt(pop, cl=jnp.exp(tcl + eta), v=jnp.exp(tv), ka=_KA)
        nlmegen.observe("conc", nlmegen.additive(conc, sd), pop)


BACKENDS = {
    "focei": (nlmegen.FOCEI(covariance="none"), "compiling the FOCEI objective and gradient ...\n"),  # not a tty
    "saem": (nlmegen.SAEM(n_explore=20, n_smooth=10, chunk=10, covariance="none"), "compiling the SAEM iteration"),
    "nuts": (nlmegen.NUTS(num_warmup=20, num_samples=20, num_chains=1), "compiling the NUTS sampler"),
    "svi": (nlmegen.SVI(num_steps=50, num_draws=20, chunk_size=50), "compiling the SVI step"),
}


@pytest.mark.parametrize("method", list(BACKENDS))
def test_each_fit_shows_its_compilation(method, capfd):
    pop = nlmegen.read_nonmem(nlmegen.datasets.load("theo_sd")).subset([1, 2, 3, 4])
    backend, expected = BACKENDS[method]
    backend.fit(_model, pop, key=jax.random.key(0))
    err = capfd.readouterr().err
    assert expected in err and re.search(r"compiled the .* in \d+\.\d s\n", err), err[-500:]
