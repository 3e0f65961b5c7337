//! Generation, greedy or sampled: the one loop behind every decoder path, loaded or
//! streamed.

use candle_core::Tensor;

use super::{DecoderModel, Family, Inputs, KvCache, Loaded, ModelError};

/// What a generation produced.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct Generation {
    /// The new tokens, in order (the prompt is not repeated).
    pub tokens: Vec<u32>,
    /// Bytes the KV cache held at the end; 0 when generating without a cache.
    pub kv_cache_bytes: u64,
    /// The logits `(1, 1, vocab)` that chose the last token.
    pub last_logits: Option<Tensor>,
}

/// How the next token is chosen: the most likely one, or a draw.
///
/// ```
/// use memwise_model::models::Sampling;
///
/// // A draw among the 40 likeliest tokens that together hold 90% of the probability,
/// // flattened by a temperature of 0.7; the same seed gives the same tokens.
/// let sampling = Sampling::new(0.7).top_k(40).top_p(0.9).seed(42);
/// assert_eq!(sampling.temperature, 0.7);
/// ```
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub struct Sampling {
    /// Divides the logits before the draw; 0 chooses the most likely token (greedy).
    pub temperature: f64,
    /// Only the `k` likeliest tokens can be drawn.
    pub top_k: Option<usize>,
    /// Only the likeliest tokens whose probabilities add up to `p` can be drawn (at least
    /// one).
    pub top_p: Option<f64>,
    /// Seeds the generator: the same seed, model and prompt give the same tokens.
    pub seed: u64,
}

impl Sampling {
    /// Draws at `temperature`, from every token, seed 0.
    pub fn new(temperature: f64) -> Self {
        Self {
            temperature,
            top_k: None,
            top_p: None,
            seed: 0,
        }
    }

    /// Keeps the `k` likeliest tokens.
    pub fn top_k(mut self, k: usize) -> Self {
        self.top_k = Some(k);
        self
    }

    /// Keeps the likeliest tokens that together hold probability `p`.
    pub fn top_p(mut self, p: f64) -> Self {
        self.top_p = Some(p);
        self
    }

    /// Sets the seed.
    pub fn seed(mut self, seed: u64) -> Self {
        self.seed = seed;
        self
    }

    fn check(&self) -> Result<(), ModelError> {
        let bad = |what: String| Err(ModelError::Input(what));
        if !self.temperature.is_finite() || self.temperature < 0.0 {
            return bad(format!(
                "temperature {} is not a number ≥ 0",
                self.temperature
            ));
        }
        if self.top_k == Some(0) {
            return bad("top_k 0 leaves no token to draw".into());
        }
        if let Some(p) = self.top_p.filter(|p| !(*p > 0.0 && *p <= 1.0)) {
            return bad(format!("top_p {p} is not in (0, 1]"));
        }
        Ok(())
    }
}

/// Chooses each next token: greedy, or a seeded draw.
struct Chooser {
    sampling: Option<(Sampling, rand_chacha::ChaCha8Rng)>,
}

impl Chooser {
    fn new(sampling: Option<&Sampling>) -> Result<Self, ModelError> {
        use rand::SeedableRng;
        let sampling = match sampling {
            Some(s) => {
                s.check()?;
                // Temperature 0 is greedy, whatever the other settings.
                (s.temperature > 0.0)
                    .then(|| (s.clone(), rand_chacha::ChaCha8Rng::seed_from_u64(s.seed)))
            }
            None => None,
        };
        Ok(Self { sampling })
    }

    fn choose(&mut self, logits: &[f32]) -> u32 {
        let greedy = || {
            logits
                .iter()
                .enumerate()
                .fold((0, f32::NEG_INFINITY), |best, (i, &l)| {
                    if l > best.1 {
                        (i, l)
                    } else {
                        best
                    }
                })
                .0 as u32
        };
        let Some((sampling, rng)) = self.sampling.as_mut() else {
            return greedy();
        };
        // Likeliest first; ties keep the lower id first, as a stable sort does.
        let mut order: Vec<u32> = (0..logits.len() as u32).collect();
        order.sort_by(|&a, &b| logits[b as usize].total_cmp(&logits[a as usize]));
        if let Some(k) = sampling.top_k {
            order.truncate(k.max(1));
        }
        let top = f64::from(logits[order[0] as usize]);
        let mut weights: Vec<f64> = order
            .iter()
            .map(|&i| ((f64::from(logits[i as usize]) - top) / sampling.temperature).exp())
            .collect();
        if let Some(p) = sampling.top_p {
            let total: f64 = weights.iter().sum();
            let mut kept = 0.0;
            let keep = weights
                .iter()
                .position(|w| {
                    kept += w / total;
                    kept >= p
                })
                .map_or(weights.len(), |i| i + 1);
            weights.truncate(keep);
            order.truncate(keep);
        }
        let total: f64 = weights.iter().sum();
        let mut draw = rand::Rng::random::<f64>(rng) * total;
        for (&token, weight) in order.iter().zip(&weights) {
            if draw < *weight {
                return token;
            }
            draw -= weight;
        }
        order[order.len() - 1]
    }
}

/// How to generate: how many tokens at most, where to stop, and how to choose.
#[derive(Debug, Clone, Default, PartialEq)]
#[non_exhaustive]
pub struct GenerateOptions {
    /// Tokens to append at most.
    pub max_new_tokens: usize,
    /// Generation stops after any of these (the model's end-of-sequence ids).
    pub eos: Vec<u32>,
    /// `None`: the most likely token each step (greedy).
    pub sampling: Option<Sampling>,
}

impl GenerateOptions {
    /// Greedy generation of up to `max_new_tokens`, stopping after any token of `eos`.
    pub fn greedy(max_new_tokens: usize, eos: &[u32]) -> Self {
        Self {
            max_new_tokens,
            eos: eos.to_vec(),
            sampling: None,
        }
    }

    /// Draws each token as `sampling` says instead.
    pub fn sampling(mut self, sampling: Sampling) -> Self {
        self.sampling = Some(sampling);
        self
    }
}

/// Appends up to `options.max_new_tokens` tokens after `prompt`, each chosen as
/// `options.sampling` says, stopping after any token of `options.eos`; `on_token` sees each
/// token as it is chosen (to print text as it comes). `forward` runs one pass and returns
/// the last position's logits; with `use_cache` each step feeds only the new token and
/// continues the cache, without it each step recomputes the whole sequence.
pub(crate) fn generate<E: From<ModelError>>(
    model: &DecoderModel,
    prompt: &[u32],
    options: &GenerateOptions,
    use_cache: bool,
    on_token: &mut dyn FnMut(u32),
    mut forward: impl FnMut(Inputs<'_>) -> Result<Tensor, E>,
) -> Result<Generation, E> {
    if prompt.is_empty() {
        return Err(ModelError::Input("the prompt holds no token".into()).into());
    }
    let mut chooser = Chooser::new(options.sampling.as_ref())?;
    let mut sequence = prompt.to_vec();
    let mut cache = use_cache.then(|| KvCache::new(model));
    let mut last_logits = None;
    let failed = |e| ModelError::stage("generate")(e);
    for _ in 0..options.max_new_tokens {
        let fed = match &cache {
            Some(cache) => &sequence[cache.seq_len()..],
            None => &sequence[..],
        };
        let ids = Tensor::new(fed, model.device())
            .and_then(|t| t.unsqueeze(0))
            .map_err(failed)?;
        let mut inputs = Inputs::new(&ids).last_position_only();
        if let Some(cache) = cache.as_mut() {
            inputs = inputs.cache(cache);
        }
        let logits = forward(inputs)?;
        let values: Vec<f32> = logits
            .flatten_all()
            .and_then(|l| l.to_dtype(candle_core::DType::F32))
            .and_then(|l| l.to_vec1())
            .map_err(failed)?;
        let next = chooser.choose(&values);
        if cache.is_some() {
            // The prompt's pass allocates activations many times a step's, and every step
            // replaces the cache's keys and values (and their copies per query head) with
            // tensors one token longer: freed blocks the next ones do not fit, which the C
            // allocator keeps (2 MiB more resident per step on a 2 GB Llama). Give them back
            // after each pass, as the spec's cleanup between batches does (about a
            // millisecond against a step's hundreds). The block cache stays: the streamed
            // stages' copies (`--no-mmap`) reuse it every step.
            memwise::clear_memory_with((), memwise::ClearOptions::between_steps());
        }
        last_logits = Some(logits);
        sequence.push(next);
        on_token(next);
        if options.eos.contains(&next) {
            break;
        }
    }
    Ok(Generation {
        tokens: sequence.split_off(prompt.len()),
        kv_cache_bytes: cache.map_or(0, |c| c.bytes()),
        last_logits,
    })
}

impl Loaded<DecoderModel> {
    /// Greedy decoding of up to `max_new_tokens` after `prompt`, stopping after any token of
    /// `eos`; see [`Generation`]. With `use_cache` keys and values are cached.
    pub fn generate_greedy(
        &self,
        prompt: &[u32],
        max_new_tokens: usize,
        eos: &[u32],
        use_cache: bool,
    ) -> Result<Generation, ModelError> {
        let options = GenerateOptions::greedy(max_new_tokens, eos);
        self.generate(prompt, &options, use_cache)
    }

    /// Generates after `prompt` as `options` says (greedy or sampled); see [`Generation`].
    pub fn generate(
        &self,
        prompt: &[u32],
        options: &GenerateOptions,
        use_cache: bool,
    ) -> Result<Generation, ModelError> {
        generate(
            self.model(),
            prompt,
            options,
            use_cache,
            &mut |_| {},
            |inputs| self.forward(inputs),
        )
    }
}

#[cfg(test)]
mod tests {
    use candle_core::{DType, Device};

    use super::*;
    use crate::models::LlamaConfig;

    fn tiny() -> DecoderModel {
        let config: LlamaConfig = serde_json::from_str(
            r#"{"model_type": "llama", "vocab_size": 10, "hidden_size": 4,
            "intermediate_size": 8, "num_hidden_layers": 1, "num_attention_heads": 2}"#,
        )
        .unwrap();
        DecoderModel::new(&config, DType::F32, &Device::Cpu).unwrap()
    }

    #[test]
    fn stops_after_an_eos_token_and_returns_only_new_tokens() {
        let model = tiny();
        // Logits that always favour token 3, then token 7 once 3 was fed.
        let mut steps = 0;
        let options = GenerateOptions::greedy(10, &[7]);
        let generation = generate(&model, &[1, 2], &options, true, &mut |_| {}, |inputs| {
            steps += 1;
            let failed = ModelError::stage("test");
            let fed = inputs
                .input_ids
                .flatten_all()
                .and_then(|t| t.to_vec1::<u32>())
                .map_err(failed)?;
            let mut logits = vec![0f32; 10];
            logits[if fed.last() == Some(&3) { 7 } else { 3 }] = 1.0;
            if let Some(cache) = inputs.cache {
                // Stands in for the pass, which counts the tokens it cached.
                cache.advance_for_test(fed.len());
            }
            Tensor::new(logits, &Device::Cpu)
                .and_then(|t| t.reshape((1, 1, 10)))
                .map_err(ModelError::stage("test"))
        })
        .unwrap();
        assert_eq!(generation.tokens, [3, 7]);
        assert_eq!(steps, 2);
        assert!(generation.last_logits.is_some());
    }

    #[test]
    fn draws_stay_in_the_top_k_and_a_seed_repeats_them() {
        let logits: Vec<f32> = (0..50).map(|i| ((i * 37) % 50) as f32 / 10.0).collect();
        let mut ranked: Vec<u32> = (0..50).collect();
        ranked.sort_by(|&a, &b| logits[b as usize].total_cmp(&logits[a as usize]));
        let top5 = &ranked[..5];
        let draws = |sampling: Sampling| {
            let mut chooser = Chooser::new(Some(&sampling)).unwrap();
            (0..400)
                .map(|_| chooser.choose(&logits))
                .collect::<Vec<u32>>()
        };
        let wide = draws(Sampling::new(2.0).top_k(5).seed(7));
        assert!(
            wide.iter().all(|t| top5.contains(t)),
            "a draw left the top 5"
        );
        // All five come up at a high temperature: the draw is not stuck on one.
        assert!(top5.iter().all(|t| wide.contains(t)));
        assert_eq!(wide, draws(Sampling::new(2.0).top_k(5).seed(7)));
        assert_ne!(wide, draws(Sampling::new(2.0).top_k(5).seed(8)));

        // Temperature 0, top-k 1 and a tiny top-p all choose the likeliest token.
        let best = ranked[0];
        for sampling in [
            Sampling::new(0.0).seed(3),
            Sampling::new(1.0).top_k(1),
            Sampling::new(1.0).top_p(1e-9),
        ] {
            assert!(
                draws(sampling.clone()).iter().all(|&t| t == best),
                "{sampling:?}"
            );
        }
        // Nucleus: tokens 3 and 9 hold 93% here, so p = 0.9 draws only them, both.
        let mut peaked = vec![0.0f32; 20];
        (peaked[3], peaked[9]) = (5.0, 4.5);
        let mut chooser = Chooser::new(Some(&Sampling::new(1.0).top_p(0.9).seed(1))).unwrap();
        let nucleus: Vec<u32> = (0..400).map(|_| chooser.choose(&peaked)).collect();
        assert!(nucleus.iter().all(|t| [3, 9].contains(t)), "{nucleus:?}");
        assert!(nucleus.contains(&3) && nucleus.contains(&9));
    }

    #[test]
    fn sampling_settings_out_of_range_are_refused() {
        for (sampling, says) in [
            (Sampling::new(-1.0), "temperature"),
            (Sampling::new(1.0).top_k(0), "top_k"),
            (Sampling::new(1.0).top_p(1.5), "top_p"),
        ] {
            let err = Chooser::new(Some(&sampling)).err().unwrap().to_string();
            assert!(err.contains(says), "{err}");
        }
    }

    #[test]
    fn an_empty_prompt_is_refused() {
        let options = GenerateOptions::greedy(3, &[]);
        let err = generate(&tiny(), &[], &options, true, &mut |_| {}, |_| {
            Tensor::zeros((1, 1, 10), DType::F32, &Device::Cpu).map_err(ModelError::stage("test"))
        })
        .unwrap_err();
        assert!(err.to_string().contains("no token"), "{err}");
    }
}
