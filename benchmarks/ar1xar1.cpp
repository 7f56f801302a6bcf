// ar1xar1: Poisson counts on an n1 x n2 lattice with a separable AR1 x AR1
// Gaussian Markov random field (unit marginal variance) on the log mean.
// Written for tmbx's benchmarks from the model description in
// examples/tmb_ar1xar1.py (same model as TMB's ar1xar1 example).
#include <TMB.hpp>

template<class Type>
Type tanh_transf(Type x) { return Type(2) / (Type(1) + exp(Type(-2) * x)) - Type(1); }

template<class Type>
Type objective_function<Type>::operator() ()
{
  DATA_ARRAY(N);              // counts, n1 x n2
  PARAMETER_ARRAY(eta);       // latent field, n1 x n2
  PARAMETER(transf_phi1);     // AR1 correlation along the first index
  PARAMETER(transf_phi2);     // AR1 correlation along the second index
  Type phi1 = tanh_transf(transf_phi1);
  Type phi2 = tanh_transf(transf_phi2);

  using namespace density;
  // SEPARABLE(f, g)(x): g acts on the first index, f on the second
  Type nll = SEPARABLE(AR1(phi2), AR1(phi1))(eta);
  for (int i = 0; i < N.size(); i++)
    nll -= dpois(N(i), exp(eta(i)), true);

  ADREPORT(phi1);
  ADREPORT(phi2);
  return nll;
}
