// Gilbert-Elliott packet loss: a Good/Bad Markov chain stepped once per packet. ns-3 has no such
// error model; this one plugs into any device's ReceiveErrorModel. Loaded with cppyy.cppdef.
//
// Per packet: Good -> Bad with probability pGoodToBad, Bad -> Good with pBadToGood; then the packet
// is lost with lossGood or lossBad. Reset() redraws the state from the stationary distribution, so
// every round starts alike; AssignStreams() makes the draws round-keyed (set the run first).
#pragma once

#include "ns3/core-module.h"
#include "ns3/network-module.h"

namespace pl_lossy
{

class GilbertElliottErrorModel : public ns3::ErrorModel
{
  public:
    static ns3::TypeId GetTypeId()
    {
        static ns3::TypeId tid = ns3::TypeId("pl_lossy::GilbertElliottErrorModel")
                                     .SetParent<ns3::ErrorModel>()
                                     .SetGroupName("Network")
                                     .AddConstructor<GilbertElliottErrorModel>();
        return tid;
    }

    GilbertElliottErrorModel()
        : m_uniform(ns3::CreateObject<ns3::UniformRandomVariable>())
    {
    }

    void SetParameters(double pGoodToBad, double pBadToGood, double lossGood, double lossBad)
    {
        m_pGoodToBad = pGoodToBad;
        m_pBadToGood = pBadToGood;
        m_lossGood = lossGood;
        m_lossBad = lossBad;
    }

    int64_t AssignStreams(int64_t stream)
    {
        m_uniform->SetStream(stream);
        return 1;
    }

    double StationaryBad() const
    {
        return m_pGoodToBad / (m_pGoodToBad + m_pBadToGood);
    }

  private:
    bool DoCorrupt(ns3::Ptr<ns3::Packet>) override
    {
        double u = m_uniform->GetValue();
        m_bad = m_bad ? !(u < m_pBadToGood) : (u < m_pGoodToBad);
        return m_uniform->GetValue() < (m_bad ? m_lossBad : m_lossGood);
    }

    void DoReset() override
    {
        m_bad = m_uniform->GetValue() < StationaryBad();
    }

    ns3::Ptr<ns3::UniformRandomVariable> m_uniform;
    double m_pGoodToBad = 0.001;
    double m_pBadToGood = 0.1;
    double m_lossGood = 0.0;
    double m_lossBad = 1.0;
    bool m_bad = false;
};

} // namespace pl_lossy
