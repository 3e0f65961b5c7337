//! Greedy generation: the one loop behind every decoder path, loaded or streamed.

use candle_core::{Tensor, D};

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

/// Appends the most likely token up to `max_new_tokens` times after `prompt`, stopping
/// after any token of `eos`. `forward` runs one pass and returns the last position's
/// logits; with `use_cache` each step feeds only the new token and continues the cache,
/// without it each step recomputes the whole sequence.
pub(crate) fn greedy<E: From<ModelError>>(
    model: &DecoderModel,
    prompt: &[u32],
    max_new_tokens: usize,
    eos: &[u32],
    use_cache: bool,
    mut forward: impl FnMut(Inputs<'_>) -> Result<Tensor, E>,
) -> Result<Generation, E> {
    if prompt.is_empty() {
        return Err(ModelError::Input("the prompt holds no token".into()).into());
    }
    let mut sequence = prompt.to_vec();
    let mut cache = use_cache.then(|| KvCache::new(model));
    let mut last_logits = None;
    let failed = |e| ModelError::stage("generate")(e);
    for _ in 0..max_new_tokens {
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
        let next = logits
            .flatten_all()
            .and_then(|l| l.argmax(D::Minus1))
            .and_then(|t| t.to_scalar::<u32>())
            .map_err(failed)?;
        last_logits = Some(logits);
        sequence.push(next);
        if eos.contains(&next) {
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
        greedy(
            self.model(),
            prompt,
            max_new_tokens,
            eos,
            use_cache,
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
        let generation = greedy(&model, &[1, 2], 10, &[7], true, |inputs| {
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
    fn an_empty_prompt_is_refused() {
        let err = greedy(&tiny(), &[], 3, &[], true, |_| {
            Tensor::zeros((1, 1, 10), DType::F32, &Device::Cpu).map_err(ModelError::stage("test"))
        })
        .unwrap_err();
        assert!(err.to_string().contains("no token"), "{err}");
    }
}
